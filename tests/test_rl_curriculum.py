"""Curriculum (improvement potential, stages, online updates, uniform ablation) and GRPO advantages."""
import numpy as np
import pytest
import torch

from rci_fast.rl import Curriculum, CurriculumConfig, group_advantages, improvement_potential, potential_groups


def test_potential_and_paper_groups():
    p = np.array([0.5, 0.3, 0.2, 0.1, 0.0, 1.0, 0.9])
    pi = improvement_potential(p)
    np.testing.assert_allclose(pi, [1.0, 0.84, 0.64, 0.36, 0.0, 0.0, 0.36])
    # [0.64, 1] -> 0, [0.48, 0.64) -> 1, [0.32, 0.48) -> 2, [0, 0.32) -> 3; 0.64 itself is group 0
    assert potential_groups(pi).tolist() == [0, 0, 0, 2, 3, 3, 2]
    assert potential_groups([0.48, 0.479, 0.32, 0.3199]).tolist() == [1, 2, 2, 3]
    with pytest.raises(ValueError, match="decreasing"):
        potential_groups(pi, thresholds=(0.3, 0.5))


def test_pass_rates_p_and_1_minus_p_share_their_group():
    """Π(p) = Π(1 - p): with the paper's k = 20 attempts, 4/20 and 16/20 (and every other pair)
    land in one group; in plain floating point Π(0.8) fell just below 0.64."""
    k = np.arange(21) / 20
    groups = potential_groups(improvement_potential(k))
    assert groups.tolist() == groups[::-1].tolist()
    assert potential_groups(improvement_potential([0.2, 0.8])).tolist() == [0, 0]


def test_online_mode_needs_a_positive_floor():
    with pytest.raises(ValueError, match="online_floor"):
        CurriculumConfig(mode="online", online_floor=0.0)


def test_staged_pools_grow_cumulatively_from_the_highest_group():
    p = np.array([0.5, 0.25, 0.15, 0.05, 0.0])  # Π = 1, 0.75, 0.51, 0.19, 0
    cur = Curriculum(p, CurriculumConfig(steps_per_stage=10))
    assert cur.groups.tolist() == [0, 0, 1, 3, 3]
    assert [cur.stage(s) for s in (0, 9, 10, 29, 30, 10_000)] == [0, 0, 1, 2, 3, 3]
    assert cur.pool(0).tolist() == [0, 1]
    assert cur.pool(10).tolist() == [0, 1, 2]
    assert cur.pool(20).tolist() == [0, 1, 2]      # group 2 is empty here
    assert cur.pool(30).tolist() == [0, 1, 2, 3, 4]
    assert set(cur.draw(0, 2).tolist()) == {0, 1}  # without replacement while the pool allows
    assert set(cur.draw(0, 7).tolist()) <= {0, 1}


def test_empty_leading_groups_fall_through():
    cur = Curriculum(np.array([0.0, 1.0, 0.02]), CurriculumConfig(steps_per_stage=5))
    assert cur.pool(0).tolist() == [0, 1, 2]  # nothing has Π >= 0.32: the first non-empty stage


def test_online_updates_and_potential_weighting():
    p = np.array([0.5, 0.0, 1.0])
    cur = Curriculum(p, CurriculumConfig(mode="online", prior_trials=2, online_floor=0.05, seed=1))
    counts = np.bincount(cur.draw(0, 20_000), minlength=3) / 20_000
    np.testing.assert_allclose(counts, np.array([1.05, 0.05, 0.05]) / 1.15, atol=0.01)
    cur.update([1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0])  # sample 1: 3 of 6 correct
    np.testing.assert_allclose(cur.pass_rates, [0.5, 3 / 8, 1.0])
    cur.update(np.array([0, 0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(cur.pass_rates[0], 3 / 4)
    counts = np.bincount(cur.draw(0, 20_000), minlength=3) / 20_000
    w = improvement_potential(cur.pass_rates) + 0.05
    np.testing.assert_allclose(counts, w / w.sum(), atol=0.01)


def test_uniform_mode_and_resume():
    cur = Curriculum(np.linspace(0, 1, 11), CurriculumConfig(mode="uniform", seed=3))
    assert cur.pool(0).size == 11
    counts = np.bincount(cur.draw(0, 22_000), minlength=11) / 22_000
    np.testing.assert_allclose(counts, np.full(11, 1 / 11), atol=0.01)
    state = cur.state_dict()
    a = cur.draw(5, 4)
    other = Curriculum(np.linspace(0, 1, 11), CurriculumConfig(mode="uniform", seed=99))
    other.load_state_dict(state)
    assert other.draw(5, 4).tolist() == a.tolist()


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        CurriculumConfig(mode="random")
    with pytest.raises(ValueError, match="pass_rates"):
        Curriculum([0.5, 1.5])
    with pytest.raises(ValueError, match="pass_rates"):
        Curriculum([])


def test_group_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.1, 0.1, -0.1, 0.5, 2.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9])
    adv = group_advantages(rewards, groups)
    for g in (7, 3, 9):
        r = rewards[groups == g].double()
        torch.testing.assert_close(adv[groups == g].double(), (r - r.mean()) / (r.std() + 1e-6),
                                   atol=1e-6, rtol=0)
    dr = group_advantages(rewards, groups, scale_by_std=False)
    torch.testing.assert_close(dr[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]), atol=1e-6, rtol=0)


def test_group_advantages_edge_cases():
    same = group_advantages(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]))
    assert torch.equal(same, torch.zeros(3))  # no signal when every answer scores the same
    single = group_advantages(torch.tensor([5.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert single[0] == 0.0
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, 2))


def test_pass_rates_from_a_policy_and_the_potential_file(tmp_path):
    from rci_fast.rl.potential import estimate_pass_rates, read_potential, write_potential
    from rci_fast.tasks import load_task

    task = load_task("rg/basic_arithmetic")
    samples = task.samples("train")[:3]
    golds = {s.prompt: task.gold_answer(s) for s in samples}
    calls = []

    def policy(conversations):  # right on every 2nd attempt of sample 0, always on 1, never on 2
        out = []
        for m in conversations:
            calls.append(m[-1]["content"])
            i = [s.prompt for s in samples].index(m[-1]["content"])
            right = i == 1 or (i == 0 and calls.count(m[-1]["content"]) % 2 == 0)
            out.append([("model", f"<<<{golds[m[-1]['content']] if right else 'nope'}>>>")])
        return out

    p = estimate_pass_rates(policy, [(task, s) for s in samples], k=4, batch_size=5)
    np.testing.assert_allclose(p, [0.5, 1.0, 0.0])
    assert len(calls) == 12
    summary = write_potential(str(tmp_path / "potential.jsonl"), [(task, s) for s in samples], p)
    assert summary["group_sizes"] == [1, 0, 0, 2]
    rows = read_potential(str(tmp_path / "potential.jsonl"))
    assert [r["group"] for r in rows] == [0, 3, 3] and rows[0]["potential"] == 1.0
    (tmp_path / "bad.jsonl").write_text('{"p": 0.5}\n{"p": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_potential(str(tmp_path / "bad.jsonl"))
