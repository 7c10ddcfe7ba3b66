"""The training recipes end to end on tiny models and data (recipes/, outside the package).

Each recipe trains a few steps (metric computed, checkpoints saved, results.json and model card written);
resuming from a checkpoint repeats the uninterrupted run's losses; a 2-process ``accelerate launch`` gives the
single-process parameters; bad arguments fail with one line before training; local files load.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSeq2SeqLM


pytest_plugins = ["fake_hub"]

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import image_classification  # noqa: E402
import summarization  # noqa: E402
import translation  # noqa: E402
from recipe_kit import builtin, loop  # noqa: E402
from recipe_kit.arguments import DataArguments, TrainArguments  # noqa: E402
from recipe_kit.data import read_image_source, read_text_file  # noqa: E402
from recipe_kit.errors import RecipeError, run_main  # noqa: E402
from recipe_kit.loop import EarlyStopping, EpochShuffleSampler  # noqa: E402
from recipe_kit.metrics import accuracy, bleu, rouge  # noqa: E402
from recipe_kit.optim import Lamb, build_optimizer, inverse_sqrt_factor  # noqa: E402
from recipe_kit.presets import available_presets, load_preset  # noqa: E402
from recipe_kit.seq2seq import train_tokenizer  # noqa: E402


TINY_T5 = "d_model=32,d_ff=64,num_heads=2,d_kv=16,num_layers=1,num_decoder_layers=1"
SEQ2SEQ = [
    "--config_overrides", TINY_T5, "--max_steps", "4", "--checkpointing_steps", "2", "--max_train_samples", "64",
    "--max_eval_samples", "8", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
    "--generation_max_length", "6", "--tokenizer_vocab_size", "120", "--warmup_steps", "2",
]  # fmt: skip
TINY_VIT = "hidden_size=16,intermediate_size=32,num_attention_heads=2,num_hidden_layers=1"
IMAGES = [
    "--config_overrides", TINY_VIT, "--max_train_samples", "32", "--max_eval_samples", "16", "--augment", "false",
    "--warmup_steps", "2", "--learning_rate", "0.01",
]  # fmt: skip


def log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_translation_trains_evaluates_saves_and_resumes_with_the_same_losses(tmp_path):
    first = tmp_path / "first"
    results = translation.main([*SEQ2SEQ, "--output_dir", str(first)])
    assert results["steps"] == 4 and 0 <= results["metrics"]["test_bleu"] <= 100
    assert results["parameters"]["total"] < results["parameters"]["dense"]
    assert json.loads((first / "results.json").read_text())["metrics"] == results["metrics"]
    assert (first / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert "## Evaluation" in (first / "README.md").read_text() and (first / "tokenizer.json").is_file()

    resumed = tmp_path / "resumed"
    checkpoint = str(first / "checkpoints" / "step_2")
    translation.main([*SEQ2SEQ, "--output_dir", str(resumed), "--resume_from_checkpoint", checkpoint])
    assert [r["step"] for r in log(resumed)] == [3, 4]
    assert [r["loss"] for r in log(resumed)] == pytest.approx([r["loss"] for r in log(first)[2:]], rel=1e-6)
    final, resumed_final = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in final.items():
        torch.testing.assert_close(resumed_final[name], tensor, rtol=1e-5, atol=1e-6)


def test_validation_during_training_restores_the_best_weights_before_the_test(tmp_path):
    output = tmp_path / "out"
    arguments = [*SEQ2SEQ, "--max_steps", "6", "--eval_steps", "2", "--group_by_length", "--checkpointing_steps", "0"]
    results = translation.main([*arguments, "--learning_rate", "0.02", "--output_dir", str(output)])
    validation = [record for record in log(output) if "validation_bleu" in record]
    assert [record["step"] for record in validation] == [2, 4, 6]
    best = max(validation, key=lambda record: record["validation_bleu"])  # the first of equal scores wins
    assert results["best_step"] == best["step"] and results["validation"] == {"bleu": best["validation_bleu"]}
    assert results["validation_evaluations"] == 3 and results["stopped_early"] is False


def test_without_a_test_split_the_best_validation_scores_are_the_final_metrics(tmp_path, monkeypatch):
    """The restored best weights were already scored on the validation split: no second evaluation of it."""
    splits = []
    evaluate = loop._evaluate
    monkeypatch.setattr(loop, "_evaluate", lambda *args: splits.append(args[-1]) or evaluate(*args))
    images, labels, classes = builtin.images(size=300)["train"]
    np.savez(tmp_path / "train.npz", images=images, labels=labels, classes=np.array(classes))
    arguments = ["--train_file", str(tmp_path / "train.npz"), "--max_steps", "4", "--eval_steps", "2"]
    results = image_classification.main([*IMAGES, *arguments, "--output_dir", str(tmp_path / "out")])
    assert results["eval_split"] == "validation" and splits == ["validation", "validation"]
    assert results["metrics"] == {"validation_accuracy": results["validation"]["accuracy"]}


@pytest.mark.parametrize("deterministic", [False, True])
def test_full_determinism_picks_paths_by_count_instead_of_timing(tmp_path, monkeypatch, deterministic):
    """A timed path choice can flip with the machine's load, and the two paths round differently."""
    from kron_transformers.factorizations import cost

    timed = []
    monkeypatch.setattr(cost, "_measure_factored_is_faster", lambda *args: timed.append(args[3]) or True)
    monkeypatch.setattr(cost, "CLEAR_MARGIN", float("inf"))  # every undecided shape would be timed
    monkeypatch.delenv(cost.COST_MODEL_ENV, raising=False)
    cost.clear_decisions()
    environment, cudnn = dict(os.environ), (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    flag = ["--full_determinism"] if deterministic else []
    try:
        translation.main([*SEQ2SEQ, *flag, "--checkpointing_steps", "0", "--output_dir", str(tmp_path / "out")])
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert cost.cost_model() == ("count" if deterministic else "measure")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        os.environ.clear()
        os.environ.update(environment)
        cost.clear_decisions()
    assert (timed == []) is deterministic


def test_early_stopping_counts_evaluations_without_improvement_and_restores_the_best():
    model = torch.nn.Linear(2, 2)
    watch = EarlyStopping(patience=2)
    watch.update(10, {"bleu": 5.0, "other": 1.0}, model)
    best = {name: value.clone() for name, value in model.state_dict().items()}
    for step, score in ((20, 5.0), (30, 4.0)):  # a tie is no improvement
        assert not watch.stop
        with torch.no_grad():
            model.weight.add_(1.0)
        watch.update(step, {"bleu": score}, model)
    assert watch.stop and watch.summary() == {
        "best_step": 10,
        "validation": {"bleu": 5.0, "other": 1.0},
        "validation_evaluations": 3,
        "stopped_early": True,
    }
    watch.restore_best(model)
    torch.testing.assert_close(model.state_dict(), best, rtol=0, atol=0)


def test_group_by_length_batches_similar_lengths_and_covers_every_example_once():
    lengths = torch.randint(1, 200, (1030,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = EpochShuffleSampler(len(lengths), seed=3, lengths=lengths, batch_size=10)
    order = list(sampler)
    assert sorted(order) == list(range(1030)) and order == list(sampler)  # same epoch, same order
    sampler.use_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 10] for i in range(0, 1030, 10)]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches[:-1]])
    assert spread < 10  # random batches of 10 from 1..199 spread ~160
    plain = list(EpochShuffleSampler(len(lengths), seed=3))
    assert np.mean([np.ptp([lengths[i] for i in plain[j : j + 10]]) for j in range(0, 1030, 10)]) > 100
    with pytest.raises(ValueError, match="need 1030 lengths and a batch size"):
        EpochShuffleSampler(1030, seed=3, lengths=lengths)


def test_summarization_compresses_a_pretrained_folder_with_svd_on_local_jsonl(tmp_path):
    splits = builtin.summarization(size=480)
    for name in ("train", "validation"):
        rows = [json.dumps({"document": d, "subject": s}) for d, s in splits[name]]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows))
    tokenizer = train_tokenizer([text for pair in splits["train"] for text in pair], 120)
    config = AutoConfig.for_model("t5", vocab_size=len(tokenizer), decoder_start_token_id=0, d_model=32, d_ff=64)
    config.update_from_string("num_heads=2,d_kv=16,num_layers=1,num_decoder_layers=1")
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")

    arguments = [*SEQ2SEQ[2:], "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--target_column", "subject"]
    arguments += [
        "--train_file",
        str(tmp_path / "train.jsonl"),
        "--validation_file",
        str(tmp_path / "validation.jsonl"),
    ]
    arguments += ["--model_name_or_path", str(tmp_path / "pretrained"), "--init", "svd"]
    results = summarization.main(arguments)
    assert results["eval_split"] == "validation"
    assert set(results["metrics"]) == {"validation_rouge1", "validation_rouge2", "validation_rougeL"}
    assert results["compression"] == "small_word2ketxs"
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["init"] == "svd" and 0 < saved["modules"]["shared"]["init_error"] < 1


def test_untie_lm_head_fine_tunes_a_compressed_checkpoint_with_its_own_head(tmp_path):
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    first = summarization.main([*SEQ2SEQ, "--max_steps", "2", "--output_dir", str(tied)])  # small_word2ketxs
    assert json.loads((tied / "config.json").read_text())["quantization_config"]["modules"]["lm_head"]["kind"] == (
        "tied_head"
    )
    arguments = [*SEQ2SEQ[2:], "--max_steps", "2", "--output_dir", str(untied), "--model_name_or_path", str(tied)]
    second = summarization.main([*arguments, "--compression", "none", "--untie_lm_head"])
    saved = json.loads((untied / "config.json").read_text())["quantization_config"]
    assert saved["untie_lm_head"] and "lm_head" not in saved["modules"] and saved["modules"]["shared"]
    head = load_file(untied / "model.safetensors")["lm_head.weight"]
    assert second["parameters"]["total"] == first["parameters"]["total"] + head.numel()


def test_kpd_l1_is_applied_in_adamws_metric(tmp_path):
    """With AdamW, lambda is eq. 4's: |dJ/dS| is far below 0.5 here, so two steps switch off nearly every block
    (the plain threshold lr * 0.5 <= 0.005 would leave S, initialized to ones, all non-zero)."""
    output = tmp_path / "out"
    results = image_classification.main([*IMAGES, "--max_steps", "2", "--kpd_l1", "0.5", "--output_dir", str(output)])
    assert results["kpd"]["block_sparsity"] > 0.9


def test_image_classification_with_kpd_l1_from_npz(tmp_path):
    parts = builtin.images(size=300)
    images, labels, classes = parts["train"]
    np.savez(tmp_path / "train.npz", images=images, labels=labels, classes=np.array(classes))
    output = tmp_path / "out"
    results = image_classification.main(
        [*IMAGES, "--train_file", str(tmp_path / "train.npz"), "--max_steps", "3", "--output_dir", str(output)]
    )
    assert results["eval_split"] == "validation" and 0 <= results["metrics"]["validation_accuracy"] <= 100
    assert results["arguments"]["kpd_l1"] == 3e-5 and (output / "preprocessor_config.json").is_file()
    kpd = results["kpd"]  # Zhu et al.'s columns: switched-off blocks, non-zeros the block-sparse layers keep
    assert 0 <= kpd["block_sparsity"] <= 1 and 0 < kpd["inference_nonzeros"] <= kpd["dense_entries"]
    config = json.loads((output / "config.json").read_text())
    assert {entry["method"] for entry in config["quantization_config"]["modules"].values()} == {"KPD"}


def test_two_process_ddp_matches_one_process_with_the_same_global_batch_and_pushes(tmp_path, fake_hub, monkeypatch):
    # one matmul path for both batch splittings (the cost model may pick per batch size): equal up to rounding
    monkeypatch.setenv("KRON_TRANSFORMERS_COST_MODEL", "factored")
    common = [*IMAGES, "--max_steps", "3", "--compression", "small_kpd"]
    image_classification.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    # accelerate 1.x: "--cpu --num_processes 2" alone runs one process (several CPU processes need MPI);
    # torchrun-based "--multi_gpu" with ACCELERATE_USE_CPU=1 runs two gloo processes on one machine.
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPES / "image_classification.py"),
        *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"),
        "--push_to_hub", "recipes/vit-kpd",
    ]  # fmt: skip
    environment = {**fake_hub.env(), "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(RECIPES.parent)}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["processes"] == 2
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:  # all-reduce sums gradients in another order; the l1 step can leave an S entry near 1e-5
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    pushed = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "results.json"}
    assert set(fake_hub.files("recipes/vit-kpd")) == pushed
    assert "| test_accuracy |" in (tmp_path / "two" / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compression", "no_such_preset"], "unknown preset 'no_such_preset'"),
        (["--train_file", "/no/such/file.jsonl"], "no such file"),
        (["--train_file", "{data}/bad.jsonl"], "line 1 is not JSON"),
        (["--train_file", "{data}/train.jsonl", "--target_column", "summary"], "no column 'summary'"),
        (["--compression", "{data}/bad.yaml"], "unknown method"),
        (["--optimizer", "sgd"], "--optimizer must be one of adamw, lamb"),
        (["--kpd_l1", "0.1"], "--kpd_l1 needs KPD layers"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint"),
        (["--early_stopping_patience", "2"], "--early_stopping_patience needs --eval_steps N > 0"),
        (["--compression", "none", "--untie_lm_head"], "--untie_lm_head: the model has no output head tied"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_training(tmp_path, capsys, extra, message):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"source": "a b", "target": "c d"}) + "\n")
    (tmp_path / "bad.yaml").write_text("attention: {method: NoSuchMethod, rank: 2}\n")
    extra = [value.format(data=tmp_path) for value in extra]
    output = tmp_path / "out"
    assert run_main(translation.main, [*SEQ2SEQ, *extra, "--output_dir", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "error: " in error and message in error, error
    assert not (output / "train_log.jsonl").exists()


def test_the_script_entry_point_prints_one_error_line():
    done = subprocess.run(
        [sys.executable, str(RECIPES / "translation.py"), "--compression", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "translation.py: error: --compression: unknown preset 'nope'; available presets: "
        + ", ".join(available_presets())
        + ", 'none', or a .yaml/.json file"
    ]


def test_local_text_formats_jsonl_csv_and_gzipped_parallel_text(tmp_path):
    args = DataArguments(source_lang="de", target_lang="en")
    (tmp_path / "a.jsonl").write_text('{"source": "eins", "target": "one"}\n{"source": "zwei", "target": "two"}\n')
    (tmp_path / "a.csv").write_text("de_text,en_text\neins,one\n")
    with gzip.open(tmp_path / "train.de.gz", "wt") as handle:
        handle.write("ein hund\neine katze\n")
    (tmp_path / "train.en").write_text("a dog\na cat\n")
    columns = ("source", "target")
    assert read_text_file(str(tmp_path / "a.jsonl"), args, columns) == [("eins", "one"), ("zwei", "two")]
    csv_args = DataArguments(source_column="de_text", target_column="en_text")
    assert read_text_file(str(tmp_path / "a.csv"), csv_args, columns) == [("eins", "one")]
    assert read_text_file(str(tmp_path / "train"), args, columns) == [("ein hund", "a dog"), ("eine katze", "a cat")]
    (tmp_path / "short.de").write_text("x\n")
    (tmp_path / "short.en").write_text("x\ny\n")
    with pytest.raises(RecipeError, match="1 de lines but 2 en lines"):
        read_text_file(str(tmp_path / "short"), args, columns)


def test_image_folder_loading_keeps_training_class_order(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", ["cat", "dog"]), ("val", ["dog"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    train = read_image_source(str(tmp_path / "train"))
    assert (
        train.images.shape == (4, 8, 8, 3)
        and train.labels.tolist() == [0, 0, 1, 1]
        and train.classes == ["cat", "dog"]
    )
    validation = read_image_source(str(tmp_path / "val"), train.classes)
    assert validation.labels.tolist() == [1, 1]
    assert np.array_equal(validation.images[0], np.asarray(Image.open(tmp_path / "val" / "dog" / "0.png")))


def test_metrics_against_known_values():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100)
    scores = rouge(["the cat sat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(100 * 2 * 1 * 0.75 / 1.75)  # P = 1, R = 3/4
    assert scores["rouge2"] == pytest.approx(100 * 2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0])["accuracy"] == 50


def test_lamb_step_matches_the_formula_and_inverse_sqrt_schedule():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    start, grad = weight.detach().clone(), torch.randn(5, 3, dtype=torch.float64)
    optimizer = Lamb([weight], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    weight.grad = grad.clone()
    optimizer.step()
    m_hat, v_hat = 0.1 * grad / 0.1, 0.01 * grad**2 / 0.01
    update = m_hat / (v_hat.sqrt() + 1e-6) + 0.01 * start
    expected = start - 0.1 * (start.norm() / update.norm()) * update
    torch.testing.assert_close(weight.detach(), expected)
    assert [inverse_sqrt_factor(s, 4) for s in (0, 3, 4, 16)] == [0.25, 1.0, 1.0, 0.5]


def test_lamb_steps_biases_without_the_trust_ratio_so_a_zero_bias_grows():
    def train_bias(adapt_bias: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3).double()
        torch.nn.init.zeros_(layer.bias)
        optimizer = build_optimizer(layer, TrainArguments(optimizer="lamb", learning_rate=0.1))
        assert [group["layer_adaptation"] for group in optimizer.param_groups] == [True, False]
        assert optimizer.param_groups[1]["params"][0] is layer.bias
        optimizer.param_groups[1]["layer_adaptation"] = adapt_bias
        inputs = torch.randn(8, 4, dtype=torch.float64)
        targets = torch.randn(8, 3, dtype=torch.float64) + 5  # the bias has to grow to about 5
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(layer(inputs), targets).backward()
            optimizer.step()
        return layer.bias.detach()

    # the plain Adam step moves each entry by about lr per step: about 0.5 after 5 steps
    assert train_bias(adapt_bias=False).min() > 0.45
    # with the trust ratio the first step is lr * u (||p|| = 0), then each step is lr * ||p||: a factor 1 + lr
    assert train_bias(adapt_bias=True).max() < 0.1 * 1.1**4 * 1.05


def test_lamb_keeps_the_trust_ratio_for_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3).double()
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(layer, TrainArguments(optimizer="lamb", learning_rate=0.1))
    layer(torch.randn(8, 4, dtype=torch.float64)).square().mean().backward()
    optimizer.step()
    assert (layer.weight.detach() - before).norm().item() == pytest.approx(0.1 * before.norm().item(), rel=1e-9)
    # a checkpoint saved before biases had their own group: one group, without the key; its step keeps the ratio
    old_state = Lamb(list(layer.parameters()), lr=0.1).state_dict()
    del old_state["param_groups"][0]["layer_adaptation"]
    resumed = Lamb(list(layer.parameters()), lr=0.1)
    resumed.load_state_dict(old_state)
    before = layer.weight.detach().clone()
    resumed.step()
    assert (layer.weight.detach() - before).norm().item() == pytest.approx(0.1 * before.norm().item(), rel=1e-9)


@pytest.mark.parametrize(
    "compressed, baseline, dense, tolerance",
    [
        ("t5_small_shapeshifter_iwslt14", "t5_small_lowrank_iwslt14", "t5_small_dense_iwslt14", 0.01),
        ("vit_tiny_kpd_cifar100", "vit_tiny_lowrank_cifar100", "vit_tiny_dense_cifar100", 0.01),
        # a LowRank 30,000 x 256 embedding has 30,256 parameters per rank: rank 2 is the nearest to 58,400
        ("summarization_word2ketxs", "summarization_lowrank", "summarization_dense", 0.04),
    ],
)
def test_paper_presets_baselines_have_equal_parameter_counts(compressed, baseline, dense, tolerance):
    presets = {name: load_preset(name) for name in (compressed, baseline, dense)}
    assert presets[dense].compression is None
    assert {k: v for k, v in presets[baseline].defaults.items() if k not in ("output_dir", "kpd_l1")} == {
        k: v for k, v in presets[compressed].defaults.items() if k not in ("output_dir", "kpd_l1")
    }
    budgets = {}
    for name in (compressed, baseline):
        config = presets[name].compression
        assert config.init == "random"
        budgets[name] = sum(
            count for role in ("embedding", "attention", "ffn") for count in _role_parameters(name, config, role)
        )
    assert budgets[baseline] == pytest.approx(budgets[compressed], rel=tolerance)


SHAPES = {  # (rows, cols) and count of each matrix per role, from the presets' model configs
    "t5_small": {
        "embedding": [((32100, 512), 1)],
        "attention": [((512, 512), 4 * 6 + 8 * 6)],
        "ffn": [((2048, 512), 12), ((512, 2048), 12)],
    },
    "vit_tiny": {"attention": [((192, 192), 4 * 12)], "ffn": [((768, 192), 12), ((192, 768), 12)]},
    "summarization": {"embedding": [((30000, 256), 1)]},
}  # fmt: skip


def _role_parameters(name: str, config, role: str) -> list[int]:
    spec = getattr(config, role)
    if spec is None:
        return []
    family = next(key for key in SHAPES if name.startswith(key))
    counts = []
    target = "embedding" if role == "embedding" else "linear"
    for (rows, cols), repeat in SHAPES[family].get(role, []):
        structure = spec.resolve(rows, cols, target, f"{name}.{role}")
        counts.append(repeat * _structure_parameters(structure, rows, cols))
    return counts


def _structure_parameters(structure: dict, rows: int, cols: int) -> int:
    rank = structure["rank"]
    if structure["factorization"] == "low_rank":
        return rank * (rows + cols)
    if structure["factorization"] == "kpd":
        m2, n2 = structure["block_size"]
        grid = (rows // m2) * (cols // n2)
        return grid + rank * (grid + m2 * n2)
    return rank * sum(a * b for a, b in structure["factor_shapes"])
