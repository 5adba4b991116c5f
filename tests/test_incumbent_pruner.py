"""pruner=incumbent: stop a trial whose running mean is confidently below the best finished trial - and its options
for surrogate studies (spare the sampler's exploitation trials; count the incumbent's own noise)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from astolfo_opt.errors import ConfigError
from astolfo_opt.search.strategies import IncumbentPruner, make_incumbent_pruner

STEPS = 16
PER_STEP = [0.04 if i % 2 else -0.04 for i in range(STEPS)]  # per-batch scores around the mean: sd ~0.041


def _finished(value: float) -> optuna.trial.FrozenTrial:
    """A complete trial that reported the running mean of ``value + PER_STEP`` after each of 16 batches."""
    iv, tot = {}, 0.0
    for k, d in enumerate(PER_STEP, start=1):
        tot += value + d
        iv[k] = tot / k
    return create_trial(state=TrialState.COMPLETE, value=iv[STEPS], params={"x": 0.5},
                        distributions={"x": FloatDistribution(0, 1)}, intermediate_values=iv)


def _study(best: float = 0.80) -> optuna.Study:
    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    for v in (0.60, 0.70, best):
        study.add_trial(_finished(v))
    return study


def _running(study: optuna.Study, means: list[float], proposal: str | None = None) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    if proposal is not None:  # what SurrogateSampler writes, straight into the storage
        study._storage.set_trial_user_attr(trial._trial_id, "proposal", proposal)
    for k, m in enumerate(means, start=1):
        trial.report(m, k)
    return trial._get_latest_trial()  # the cached copy Optuna hands to pruners (without the sampler's attribute)


def test_prunes_only_what_is_confidently_below_the_incumbent():
    study = _study()
    pr = IncumbentPruner(z=2.0)
    assert pr.prune(study, _running(study, [0.60, 0.61, 0.60, 0.62]))      # 0.6 + 2*0.041/2 = 0.64 < 0.80
    assert not pr.prune(study, _running(study, [0.78, 0.79, 0.78, 0.79]))  # within noise of the incumbent
    assert not pr.prune(study, _running(study, [0.20]))                    # warm-up: never at the first batch
    minimise = optuna.create_study(direction="minimize", storage=optuna.storages.InMemoryStorage())
    for v in (0.9, 0.8, 0.2):
        minimise.add_trial(_finished(v))
    assert pr.prune(minimise, _running(minimise, [0.6, 0.6, 0.6, 0.6])) and not pr.prune(minimise, _running(minimise, [0.25, 0.22]))


def test_steps_count_images_when_a_batch_holds_several_prompts():
    """The evaluator reports after each batch with step = images scored so far (4, 8, 12, 16 with 4 prompts per
    pipeline call, as the shipped renders batch). The spread is per image: batch means ±0.05 over 4 images each give
    sd² = 4·0.05²·16/12, and a trial 8 images in is stopped once mean + 2·sd/√8 < 0.80 - not before, not never."""
    def finished(value: float) -> optuna.trial.FrozenTrial:
        iv, tot = {}, 0.0
        for b in range(4):
            tot += 4 * (value + (0.05 if b % 2 else -0.05))
            iv[4 * (b + 1)] = tot / (4 * (b + 1))
        return create_trial(state=TrialState.COMPLETE, value=iv[16], params={"x": 0.5},
                            distributions={"x": FloatDistribution(0, 1)}, intermediate_values=iv)

    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    for v in (0.60, 0.70, 0.80):
        study.add_trial(finished(v))
    sd = (4 * 0.05**2 * 16 / 12) ** 0.5
    margin = 2.0 * sd / 8**0.5  # ~0.082

    def after_two_batches(mean: float) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        trial.report(mean, 4)
        trial.report(mean, 8)
        return trial._get_latest_trial()

    pr = IncumbentPruner(z=2.0)
    assert pr.prune(study, after_two_batches(0.80 - margin - 0.01))
    assert not pr.prune(study, after_two_batches(0.80 - margin + 0.01))


def test_paired_compares_with_the_incumbent_on_the_same_prompts():
    """Fixed prompts and seeds: the first 4 prompts are hard for every merge (0.3 below their mean). Unpaired, a trial
    0.02 better than the incumbent on every prompt looks 0.28 below the incumbent's final mean after 4 images and is
    stopped (per-image sd ~0.26 from the difficulty spread). Paired, it is compared with the incumbent's own first 4
    images: kept, while one 0.05 worse everywhere is stopped (batch differences spread ±0.01)."""
    difficulty = [-0.3] * 4 + [0.1] * 12  # 16 prompts, batches of 2 images: the mean difficulty is 0

    def finished(level: float, jitter: float) -> optuna.trial.FrozenTrial:
        iv, tot = {}, 0.0
        for i, d in enumerate(difficulty):
            tot += level + d + (jitter if (i // 2) % 2 else -jitter)
            if i % 2:
                iv[i + 1] = tot / (i + 1)
        return create_trial(state=TrialState.COMPLETE, value=iv[16], params={"x": 0.5},
                            distributions={"x": FloatDistribution(0, 1)}, intermediate_values=iv)

    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    for level, jitter in ((1.40, 0.0), (1.30, 0.01), (1.35, -0.01), (1.20, 0.01)):
        study.add_trial(finished(level, jitter))

    def first_four(level: float) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        trial.report(level - 0.3, 2)
        trial.report(level - 0.3, 4)
        return trial._get_latest_trial()

    plain, paired = IncumbentPruner(z=2.0), IncumbentPruner(z=2.0, paired=True)
    assert paired.prune(study, first_four(1.35))
    assert not paired.prune(study, first_four(1.42))   # better than the incumbent on the same prompts
    assert not paired.prune(study, first_four(1.395))  # 0.005 worse: within 2 paired sds (~0.015 at k = 4)
    assert plain.prune(study, first_four(1.42))        # the plain test loses the better trial to the hard prompts
    assert not plain.prune(study, first_four(1.45))


def test_spare_exploit_keeps_the_samplers_best_guess_running():
    study = _study()
    means = [0.60, 0.61, 0.60, 0.62]
    spare = IncumbentPruner(spare_exploit=True)
    assert not spare.prune(study, _running(study, means, proposal="exploit"))  # read from the storage, not the cache
    assert spare.prune(study, _running(study, means, proposal="explore"))
    assert spare.prune(study, _running(study, means))
    assert IncumbentPruner().prune(study, _running(study, means, proposal="exploit"))  # option off: pruned as before


def test_incumbent_noise_widens_the_margin_by_the_incumbents_own_error():
    """The best finished value is itself a 16-batch mean (and the max of many such): with ``incumbent_noise`` the test
    is the two-sample one, z·sd·√(1/k + 1/16) instead of z·sd/√k."""
    study = _study()
    sd = 0.04 * (16 / 15) ** 0.5  # the pooled per-batch spread of the finished trials
    k = 8
    m = 0.80 - 2.0 * sd * (1 / k) ** 0.5 - 0.005  # just below the plain margin, inside the two-sample one
    means = [m] * k
    assert IncumbentPruner(z=2.0).prune(study, _running(study, means))
    assert not IncumbentPruner(z=2.0, incumbent_noise=True).prune(study, _running(study, means))


def test_config_options_are_checked():
    pr = make_incumbent_pruner(z=1.5, spare_exploit=True, incumbent_noise=True)
    assert pr.z == 1.5 and pr.spare_exploit and pr.incumbent_noise
    with pytest.raises(ConfigError, match="pruner.zz is not an option"):
        make_incumbent_pruner(zz=1)
