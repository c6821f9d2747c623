"""Run pictures: per-task loss in metrics.jsonl, plots/loss.png and plots/scores.png, ``train --threads/--quiet``,
and bench plot labels that do not overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import toy_run_config

from mtpeft.training.task_losses import TaskLosses

PNG = b"\x89PNG\r\n\x1a\n"


class _Out:
    def __init__(self, logits=None, loss=None):
        self.logits, self.loss = logits, loss


class _Train:
    log_every, steps = 2, 5


def test_task_losses_split_the_batch_by_task() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4], [-100, 5, -100, -100]])
    batch = {"labels": labels, "task_ids": torch.tensor([0, 1, 0])}
    losses = TaskLosses(["a", "b"], _Train(), step=2)
    assert losses.add(_Out(logits), batch).logits is logits  # it wraps the forward call

    def token_losses(row: int) -> list[float]:  # position t predicts label t + 1
        return [float(F.cross_entropy(logits[row, t][None], labels[row, t + 1][None]))
                for t in range(3) if labels[row, t + 1] != -100]

    a = token_losses(0) + token_losses(2)
    b = token_losses(1)
    record = losses.record()
    assert record["task_loss/a"] == pytest.approx(sum(a) / len(a), rel=1e-5)
    assert record["task_loss/b"] == pytest.approx(sum(b) / len(b), rel=1e-5)
    # not a logged step (log_every 2): nothing computed; the last step always is
    assert TaskLosses(["a", "b"], _Train(), step=3).add(_Out(logits), batch) and not TaskLosses(
        ["a", "b"], _Train(), step=3).record()
    # without logits (chunked loss) the decoder's hidden states go through the head again, without gradients
    class Decoder(torch.nn.Module):
        def forward(self, hidden):
            return (hidden * 2,)

    class CausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = Decoder(), torch.nn.Linear(5, 7)

        def get_decoder(self):
            return self.decoder

        def get_output_embeddings(self):
            return self.head

    lm = CausalLM()
    hidden = torch.randn(3, 4, 5, requires_grad=True)
    chunked = TaskLosses(["a", "b"], _Train(), step=5, base_model=lm)
    states = lm.decoder(hidden)[0]  # the training forward: the hook catches its hidden states
    chunked.add(_Out(None, torch.tensor(9.0)), batch)
    with torch.no_grad():
        logits = lm.head(states)
    a, b = token_losses(0) + token_losses(2), token_losses(1)
    record = chunked.record()
    assert record["task_loss/a"] == pytest.approx(sum(a) / len(a), rel=1e-5)
    assert record["task_loss/b"] == pytest.approx(sum(b) / len(b), rel=1e-5)
    assert not lm.decoder._forward_hooks  # removed with the record
    assert TaskLosses(["a"], _Train(), step=5).add(_Out(None, torch.tensor(1.0)), batch) and not TaskLosses(
        ["a"], _Train(), step=5).record()  # no base model: micro-batches without logits are left out


def test_run_writes_per_task_losses_and_plots(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    from mtpeft.cli import main

    config = toy_run_config(tmp_path, tiny_model_dir, steps=6, eval_every=3, log_every=1)
    config["eval"]["before_training"] = True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--threads", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "evaluate" in err and "train:" not in err  # --quiet: only the evaluation's progress line
    run = Path(config["output_dir"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 6 and all(any(k.startswith("task_loss/") for k in r) for r in train)
    assert {k for r in train for k in r if k.startswith("task_loss/")} == {"task_loss/copy", "task_loss/parity"}
    evals = [r for r in records if "eval_macro" in r]
    assert [r["step"] for r in evals] == [3] and {"eval/copy", "eval/parity"} <= set(evals[0])
    for name in ("loss.png", "scores.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG


def test_train_threads_must_be_positive(tmp_path: Path, capsys) -> None:
    from mtpeft.cli import main

    assert main(["train", str(tmp_path / "missing.yaml"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_score_vs_params_labels_never_overlap(tmp_path: Path) -> None:
    """lora and align_lora at the same point (same parameters, same score) get separate labels."""
    from matplotlib.text import Text

    from mtpeft.bench.plots import place_labels
    from mtpeft.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(7424, 25.0, "lora", "C0"), (7424, 25.0, "align_lora", "C1"), (7500, 25.1, "thanora", "C2"),
              (20096, 20.8, "hydralora", "C3"), (22272, 20.8, "single_task_lora", "C4")]
    for x, y, _, c in points:
        ax.plot([x], [y], "o", color=c)
    ax.set_xscale("log")
    ax.set_xlim(3000, 200000)
    ax.set_ylim(18, 28)
    fig.tight_layout()
    place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = []
    for t in ax.texts:  # the text itself, not its leader line
        t.update_positions(renderer)
        boxes.append(Text.get_window_extent(t, renderer))
    assert sorted(t.get_text() for t in ax.texts) == sorted(p[2] for p in points)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)
