"""NeuKron (Kwon et al.): constant-size lossy compression of sparse reorderable matrices and tensors.

```py
import torch
import kron_transformers as kt

x = torch.sparse_coo_tensor(torch.tensor([[0, 1, 5], [2, 3, 7]]), torch.tensor([1.0, 2.0, 3.0]), (6, 9))
compressor = kt.neukron.NeuKron(hidden_size=8).fit(x, epochs=20)
compressor.predict(torch.tensor([0, 1]), torch.tensor([2, 3]))
```

Modules: ``layout`` (Kronecker digits), ``network`` (the LSTM/GRU model), ``reorder`` (min-hash pair
swaps), ``inputs`` (sparse input formats), ``compressor`` (``NeuKron``: fit, predict, exact error, save/load).
"""

from .compressor import NeuKron, NeuKronConfig
from .inputs import SparseInput, as_sparse_input
from .layout import KroneckerLayout
from .network import DigitSequenceModel
from .reorder import minhash_signatures, propose_swaps, reorder_mode


__all__ = [
    "DigitSequenceModel",
    "KroneckerLayout",
    "NeuKron",
    "NeuKronConfig",
    "SparseInput",
    "as_sparse_input",
    "minhash_signatures",
    "propose_swaps",
    "reorder_mode",
]
