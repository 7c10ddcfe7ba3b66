"""``NeuKron``: constant-size lossy compression of a sparse reorderable matrix or tensor (Kwon et al.).

``fit`` alternates, every epoch, order optimization (``reorder``, section 4.2) with one optimizer step
on the model (``network``, section 4.1) using the exact squared Frobenius error

    ||X - Y||^2 = ||X||^2 - 2 <X, Y> + ||Y||^2,

where ``<X, Y>`` needs the model only at the non-zeros of ``X`` and ``||Y||^2`` comes from the
unit-norm levels in closed form (``DigitSequenceModel.squared_norm``), so the error is exact and costs
``O(nnz)`` model evaluations plus ``O(sum_d N_d)`` for a padded boundary (Theorem 6). As in the
reference, a full-batch step that raises the error by more than 10% is undone and retried with a 10x
smaller learning rate, and the best model/orders seen are kept.

The output is the model (its size does not depend on the input's size, Theorem 8) plus the learned
orders (one integer per row/column/mode index), both saved by ``save``.

Values: the paper's softplus factors make every entry non-negative, so ``fit`` rejects negative values
unless ``signed=True``, which drops the softplus (factors are the L2-normalised raw scores, so the
closed-form ``||Y||^2`` still holds and entries can take either sign).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .inputs import SparseInput, as_sparse_input
from .layout import KroneckerLayout
from .network import CELLS, DigitSequenceModel
from .reorder import reorder_mode


CONFIG_NAME = "neukron.json"
WEIGHTS_NAME = "neukron.safetensors"
FORMAT = "kron_transformers.neukron"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class NeuKronConfig:
    """Hyperparameters of a NeuKron model (Kwon et al., section 4; supplementary sections 1 and 6)."""

    hidden_size: int = field(metadata={"help": "Hidden size h of the recurrent cell (the paper uses 30 to 90)."})
    seed_shape: tuple[int, ...] = field(
        default=(2, 2), metadata={"help": "Seed size per mode; digits of mode d are base seed_shape[d]."}
    )
    cell: str = field(default="lstm", metadata={"help": "Recurrent cell: 'lstm' (paper) or 'gru' (Figure 11)."})
    signed: bool = field(
        default=False,
        metadata={"help": "Drop the softplus so entries may be negative (needed for signed inputs)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Model dtype: 'float32' or 'float64'."})

    def __post_init__(self) -> None:
        self.seed_shape = tuple(self.seed_shape)
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size < 1:
            raise ValueError(f"NeuKron: hidden_size must be a positive int, got {self.hidden_size!r}")
        if len(self.seed_shape) < 2 or any(not isinstance(n, int) or n < 2 for n in self.seed_shape):
            raise ValueError(
                f"NeuKron: seed_shape must give an int >= 2 for each of >= 2 modes, got {self.seed_shape!r}"
            )
        if self.cell not in CELLS:
            raise ValueError(f"NeuKron: cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"NeuKron: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


class NeuKron:
    """Compress a sparse matrix/tensor into an autoregressive model over Kronecker digits plus learned orders.

    ```py
    compressor = NeuKron(hidden_size=8).fit(matrix, epochs=200)
    compressor.predict(rows, cols)           # entries, in O(log N) each (Theorem 5)
    compressor.approximation_error()         # exact ||X - Y||_F^2 in O(nnz)
    ```
    """

    def __init__(
        self,
        hidden_size: int,
        seed_shape: tuple[int, ...] = (2, 2),
        cell: str = "lstm",
        signed: bool = False,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        self.config = NeuKronConfig(hidden_size, tuple(seed_shape), cell, signed, dtype)
        self.seed = seed
        self.layout: KroneckerLayout | None = None
        self.model: DigitSequenceModel | None = None
        self.orders: list[torch.Tensor] = []
        self.history: list[float] = []
        self._data: SparseInput | None = None

    # ------------------------------------------------------------------ building

    def _build(self, shape: tuple[int, ...]) -> None:
        if len(shape) != len(self.config.seed_shape):
            raise ValueError(
                f"NeuKron: the input has order {len(shape)} (shape {shape}) but seed_shape is "
                f"{self.config.seed_shape}; pass one seed size per mode, e.g. seed_shape={(2,) * len(shape)}"
            )
        self.layout = KroneckerLayout(tuple(shape), self.config.seed_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = DigitSequenceModel(self.layout, self.config.hidden_size, self.config.cell, self.config.signed)
        self.model = model.to(DTYPES[self.config.dtype])
        self.orders = [torch.arange(size) for size in shape]

    def _require_model(self, caller: str) -> DigitSequenceModel:
        if self.model is None:
            raise RuntimeError(f"NeuKron.{caller}: the compressor is not fitted; call fit() or NeuKron.load() first")
        return self.model

    # ------------------------------------------------------------------ evaluation

    def _evaluate_positions(self, positions: torch.Tensor, batch_size: int = 2**16) -> torch.Tensor:
        model = self._require_model("predict")
        with torch.no_grad():
            chunks = [
                model(self.layout.tokens(positions[:, start : start + batch_size]))
                for start in range(0, positions.shape[1], batch_size)
            ]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=model.start.dtype)

    def _positions(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.orders[mode][indices[mode]] for mode in range(len(self.orders))])

    def _error(self, data: SparseInput, batch_size: int, backward: bool) -> float:
        """``||X||^2 - 2 <X, Y> + ||Y||^2`` (exact); accumulates gradients when ``backward``."""
        model = self.model
        inner = 0.0
        with torch.set_grad_enabled(backward):
            for start in range(0, data.nnz, batch_size):
                stop = start + batch_size
                tokens = self.layout.tokens(self._positions(data.indices[:, start:stop]))
                part = (data.values[start:stop].to(model.start.dtype) * model(tokens)).sum()
                if backward:
                    (-2 * part).backward()
                inner += float(part.detach())
            norm = model.squared_norm()
            if backward:
                norm.backward()
        return data.squared_norm() - 2 * inner + float(norm.detach())

    @torch.no_grad()
    def _fit_scale(self, data: SparseInput, batch_size: int) -> None:
        """Closed-form best scale for the initial factors: ``c = <X, Z> / ||Z||^2`` with ``Z`` the unscaled model."""
        model = self.model
        model.log_scale.zero_()
        inner = 0.0
        for start in range(0, data.nnz, batch_size):
            stop = start + batch_size
            tokens = self.layout.tokens(self._positions(data.indices[:, start:stop]))
            inner += float((data.values[start:stop].to(model.start.dtype) * model(tokens)).sum())
        if inner < 0:
            model.start.neg_()
            inner = -inner
        norm = float(model.squared_norm())
        scale = inner / norm if inner > 0 else math.sqrt(data.squared_norm() / norm)
        model.log_scale.fill_(math.log(scale))

    def _full_batch_step(
        self, data: SparseInput, batch_size: int, optimizer: torch.optim.Optimizer, lr: float, check: bool
    ) -> float:
        """One Adam step on the exact error; a step raising it by > 10% is redone at lr x 0.1 (up to 10 times)."""
        model = self.model
        optimizer.zero_grad()
        before = self._error(data, batch_size, backward=True)
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
        optimizer.step()
        error = self._error(data, batch_size, backward=False)
        for retry in range(10):
            if not check or error <= 1.1 * before:
                break
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1 ** (retry + 1)
            optimizer.step()
            error = self._error(data, batch_size, backward=False)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return error

    def _minibatch_steps(
        self,
        data: SparseInput,
        batch_size: int,
        optimizer: torch.optim.Optimizer,
        steps: int,
        generator: torch.Generator,
    ) -> float:
        """``steps`` Adam steps on disjoint random slices of the non-zeros, each with the unbiased estimate
        ``||Y||^2 - 2 (nnz / |B|) sum_B x y`` of the error (minus the constant ``||X||^2``)."""
        model = self.model
        for batch in torch.randperm(data.nnz, generator=generator).chunk(steps):
            optimizer.zero_grad()
            tokens = self.layout.tokens(self._positions(data.indices[:, batch]))
            inner = (data.values[batch].to(model.start.dtype) * model(tokens)).sum()
            (model.squared_norm() - 2 * data.nnz / batch.numel() * inner).backward()
            optimizer.step()
        return self._error(data, batch_size, backward=False)

    # ------------------------------------------------------------------ public API

    def fit(
        self,
        x: Any,
        epochs: int = 100,
        *,
        lr: float = 0.1,
        reorder: bool = True,
        gamma: float = math.inf,
        reorder_passes: int = 2,
        steps_per_epoch: int = 1,
        batch_size: int = 2**15,
        keep_best: bool = True,
        verbose: bool = False,
    ) -> NeuKron:
        """Fit to ``x`` (sparse matrix/tensor, see ``inputs.as_sparse_input``) for ``epochs`` epochs.

        An epoch is ``reorder_passes`` swap passes over every mode (acceptance ``min(1, exp(-gamma delta))``,
        ``gamma=math.inf`` for hill climbing; skipped when ``reorder=False``) followed by one Adam step
        on the exact error (full batch as in the paper, gradients accumulated over chunks of ``batch_size``
        non-zeros). ``steps_per_epoch > 1`` instead takes that many Adam steps on disjoint random slices of
        the non-zeros (unbiased estimates of the error's gradient): more updates for the same work.
        ``history`` holds the exact squared error after every epoch. Starts from scratch every call.
        """
        data = as_sparse_input(x, "NeuKron.fit")
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"NeuKron.fit: epochs must be a non-negative int, got {epochs!r}")
        if not (gamma > 0):
            raise ValueError(f"NeuKron.fit: gamma must be > 0 (math.inf for hill climbing), got {gamma!r}")
        if not (lr > 0) or batch_size < 1 or reorder_passes < 0 or steps_per_epoch < 1:
            raise ValueError(
                f"NeuKron.fit: need lr > 0, batch_size >= 1, reorder_passes >= 0, steps_per_epoch >= 1; got "
                f"lr={lr}, batch_size={batch_size}, reorder_passes={reorder_passes}, steps_per_epoch={steps_per_epoch}"
            )
        if not self.config.signed and bool((data.values < 0).any()):
            raise ValueError(
                f"NeuKron.fit: the input has negative values (min {float(data.values.min()):g}) but the paper's "
                "softplus factors only produce entries >= 0; use NeuKron(..., signed=True) for signed data"
            )
        self._build(data.shape)
        self._data = data
        self._fit_scale(data, batch_size)
        model = self.model
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        error = self._error(data, batch_size, backward=False)
        best = (error, copy.deepcopy(model.state_dict()), [order.clone() for order in self.orders])
        self.history = []
        for epoch in range(epochs):
            if reorder:
                for _ in range(reorder_passes):
                    for mode in range(data.order):
                        reorder_mode(self._evaluate_positions, data, self.orders, self.layout, mode, gamma, generator)
            if steps_per_epoch == 1:
                error = self._full_batch_step(data, batch_size, optimizer, lr, check=epoch > 0)
            else:
                error = self._minibatch_steps(data, batch_size, optimizer, steps_per_epoch, generator)
            self.history.append(error)
            if error < best[0]:
                best = (error, copy.deepcopy(model.state_dict()), [order.clone() for order in self.orders])
            if verbose:
                print(f"NeuKron epoch {epoch}: squared error {error:.6g}")
        if keep_best:
            model.load_state_dict(best[1])
            self.orders = best[2]
        return self

    def predict(self, *indices: Any) -> torch.Tensor:
        """Entries at original indices ``predict(rows, cols)`` (order D: one index array per mode), broadcast."""
        self._require_model("predict")
        if len(indices) != self.layout.order:
            raise ValueError(
                f"NeuKron.predict: the compressed input has order {self.layout.order} (shape {self.layout.shape}); "
                f"pass {self.layout.order} index arrays, got {len(indices)}"
            )
        tensors = []
        for mode, index in enumerate(indices):
            tensor = torch.as_tensor(index)
            if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
                raise TypeError(f"NeuKron.predict: indices must be integers, got dtype {tensor.dtype}")
            size = self.layout.shape[mode]
            if tensor.numel() and (bool((tensor < 0).any()) or bool((tensor >= size).any())):
                raise ValueError(
                    f"NeuKron.predict: mode-{mode} indices must lie in [0, {size}) for shape {self.layout.shape}"
                )
            tensors.append(tensor.long())
        tensors = torch.broadcast_tensors(*tensors)
        shape = tensors[0].shape
        positions = self._positions(torch.stack([tensor.reshape(-1) for tensor in tensors]))
        return self._evaluate_positions(positions).reshape(shape)

    def reconstruct(self, max_entries: int = 2**22) -> torch.Tensor:
        """The dense approximation of the whole input (small inputs only: at most ``max_entries`` entries)."""
        self._require_model("reconstruct")
        entries = math.prod(self.layout.shape)
        if entries > max_entries:
            raise ValueError(
                f"NeuKron.reconstruct: shape {self.layout.shape} has {entries} entries, above max_entries="
                f"{max_entries}; use predict() on the entries you need, or raise max_entries"
            )
        grid = torch.meshgrid(*[torch.arange(size) for size in self.layout.shape], indexing="ij")
        return self.predict(*grid)

    def approximation_error(self, x: Any = None, batch_size: int = 2**15) -> float:
        """Exact squared Frobenius error ``||X - Y||_F^2`` in ``O(nnz)`` (defaults to the fitted input)."""
        self._require_model("approximation_error")
        if x is None:
            if self._data is None:
                raise ValueError("NeuKron.approximation_error: no fitted input is held (loaded model); pass x")
            data = self._data
        else:
            data = as_sparse_input(x, "NeuKron.approximation_error")
            if data.shape != self.layout.shape:
                raise ValueError(
                    f"NeuKron.approximation_error: x has shape {data.shape}, the model was fitted to "
                    f"{self.layout.shape}"
                )
        return self._error(data, batch_size, backward=False)

    def num_parameters(self) -> int:
        """Model parameters (constant in the input size, Theorem 8); the orders are stored separately."""
        return sum(parameter.numel() for parameter in self._require_model("num_parameters").parameters())

    def save(self, path: str | os.PathLike) -> None:
        """Write ``neukron.json`` (config, shape) and ``neukron.safetensors`` (model, orders) to directory ``path``."""
        model = self._require_model("save")
        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT, "version": 1, **asdict(self.config), "shape": list(self.layout.shape)}
        meta["seed_shape"] = list(self.config.seed_shape)
        with open(os.path.join(path, CONFIG_NAME), "w") as handle:
            json.dump(meta, handle, indent=2)
        tensors = {f"model.{name}": tensor.contiguous() for name, tensor in model.state_dict().items()}
        tensors.update({f"order.{mode}": order.contiguous() for mode, order in enumerate(self.orders)})
        save_file(tensors, os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuKron:
        """Rebuild a compressor written by ``save`` (safetensors + json; nothing is unpickled)."""
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"NeuKron.load: no {CONFIG_NAME} in {path!r}")
        with open(config_path) as handle:
            meta = json.load(handle)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"NeuKron.load: {config_path} is not a NeuKron checkpoint (format {meta.get('format')!r})"
            )
        compressor = cls(meta["hidden_size"], tuple(meta["seed_shape"]), meta["cell"], meta["signed"], meta["dtype"])
        compressor._build(tuple(meta["shape"]))
        tensors = load_file(os.path.join(path, WEIGHTS_NAME))
        compressor.model.load_state_dict(
            {name[len("model.") :]: tensor for name, tensor in tensors.items() if name.startswith("model.")}
        )
        compressor.orders = [tensors[f"order.{mode}"].long() for mode in range(len(meta["shape"]))]
        return compressor
