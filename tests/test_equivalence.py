"""The algorithm's anchor identities, proved on real training runs (no special cases in the code).

(a) DiLoCo with K=1 and outer sgd lr=1 is plain training: the outer step returns the worker's own params.
(b) DiLoCo with H=1, inner SGD and outer sgd lr=1 is synchronous data parallelism: the mean of K one-step
    SGD updates from the same point is one SGD step on the mean gradient (linear in the gradient, momentum too).
"""

from __future__ import annotations

from helpers import final_params, max_rel_diff, tiny_config

from locoswarm.trainer import train


def test_k1_outer_sgd_lr1_equals_plain_training(tmp_path):
    common = dict(workers=1, train__checkpoint_every=1, train__max_steps=12)
    diloco = tiny_config(algorithm__name="diloco", algorithm__inner_steps=4, outer_optimizer__name="sgd",
                         outer_optimizer__lr=1.0, outer_optimizer__momentum=0.0, **common)  # fmt: skip
    ddp = tiny_config(algorithm__name="ddp", **common)
    s1 = train(diloco, tmp_path / "diloco")
    s2 = train(ddp, tmp_path / "ddp")
    assert s1["status"] == s2["status"] == "ok"
    assert s1["outer_steps"] == 3 and s2["outer_steps"] == 12
    rel = max_rel_diff(final_params(tmp_path / "diloco"), final_params(tmp_path / "ddp"))
    assert rel <= 1e-6, rel
    # And it did train: the params moved away from the init by far more than the tolerance.
    assert s1["final_val_loss"] == s1["final_val_loss"]  # not NaN


def test_h1_inner_sgd_outer_sgd_equals_ddp(tmp_path):
    common = dict(
        workers=4,
        train__checkpoint_every=1,
        train__max_steps=10,
        train__grad_clip=0.0,  # ddp clips the averaged gradient, diloco each worker's: equal only unclipped
        inner_optimizer__name="sgd",
        inner_optimizer__lr=0.5,
        inner_optimizer__momentum=0.5,
        inner_optimizer__weight_decay=0.01,
    )
    diloco = tiny_config(algorithm__name="diloco", algorithm__inner_steps=1, outer_optimizer__name="sgd",
                         outer_optimizer__lr=1.0, outer_optimizer__momentum=0.0, **common)  # fmt: skip
    ddp = tiny_config(algorithm__name="ddp", **common)
    train(diloco, tmp_path / "diloco")
    train(ddp, tmp_path / "ddp")
    p_diloco, p_ddp = final_params(tmp_path / "diloco"), final_params(tmp_path / "ddp")
    rel = max_rel_diff(p_diloco, p_ddp)
    assert rel <= 1e-6, rel
    # Every worker ends on the same params in both algorithms.
    for w in range(1, 4):
        assert max_rel_diff(final_params(tmp_path / "diloco", w), p_diloco) == 0.0


def test_equivalence_is_not_vacuous(tmp_path):
    """The same comparison with H=2 must NOT match: the tolerance above is tight enough to see a difference."""
    common = dict(workers=4, train__checkpoint_every=1, train__max_steps=10, train__grad_clip=0.0,
                  inner_optimizer__name="sgd", inner_optimizer__lr=0.5)  # fmt: skip
    diloco = tiny_config(algorithm__name="diloco", algorithm__inner_steps=2, outer_optimizer__name="sgd",
                         outer_optimizer__lr=1.0, outer_optimizer__momentum=0.0, **common)  # fmt: skip
    ddp = tiny_config(algorithm__name="ddp", **common)
    train(diloco, tmp_path / "diloco")
    train(ddp, tmp_path / "ddp")
    assert max_rel_diff(final_params(tmp_path / "diloco"), final_params(tmp_path / "ddp")) > 1e-4
