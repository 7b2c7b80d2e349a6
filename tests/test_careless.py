"""Careless inputs to every public name: a documented result, or an error
that names the argument.

The table walks ``optaxclip.__all__``: every public function is called with
the kinds of mistakes users make (a threshold of the wrong kind, sign or
shape, a callable that is not a schedule, a flag that is not a bool, odd
gradient trees), and each call must raise an exception of the documented
class whose message names the argument, or give the documented result. The
cases that were silently wrong before have a test of their own below.
"""

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc

NAN, INF = math.nan, math.inf
G = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "b": jnp.array([1.0, 2.0])}
# The message names the whole-rule argument ``clip`` (not as part of
# "clipped_grad" or "per_example_clip") or the threshold inside it.
CLIP = r"(?<![\w.])clip(?!\w)|max_norm"


def _per_example_clip(clip):
  """per_example_clip on G (a batch of two examples), traced but not
  compiled: ``clip`` is checked as in an eager call."""
  return jax.eval_shape(lambda g: oc.per_example_clip(g, clip), G)


# name -> (build(value) for the argument under test, a pattern of the
# argument's name). Each builds the transform (or calls the function); a
# transform's update is then traced on G (``_run``), so that errors raised at
# the first trace count.
THRESHOLDS = {
    "clip_by_global_norm": (lambda v: oc.clip_by_global_norm(v), "max_norm"),
    "clip_by_norm": (lambda v: oc.clip_by_norm(v), "max_norm"),
    "clip_by_value": (lambda v: oc.clip_by_value(v), "max_value"),
    "adaptive_grad_clip": (lambda v: oc.adaptive_grad_clip(v), "clipping"),
    "clip_by_quantile": (lambda v: oc.clip_by_quantile(v), "quantile"),
    "zclip": (lambda v: oc.zclip(v), "rule"),
    "zclip/decay": (lambda v: oc.zclip(oc.ZScore(decay=v)), "decay"),
    "zclip/num_std": (lambda v: oc.zclip(oc.ZScore(num_std=v)), "num_std"),
    "zclip/std_floor": (lambda v: oc.zclip(oc.ZScore(std_floor=v)),
                        "std_floor"),
    "zclip/max_norm": (lambda v: oc.zclip(max_norm=v), "max_norm"),
    "adagc": (lambda v: oc.adagc(v), "max_ratio"),
    "adagc/decay": (lambda v: oc.adagc(decay=v), "decay"),
    "adagc/max_norm": (lambda v: oc.adagc(max_norm=v), "max_norm"),
    "clip_spikes": (lambda v: oc.clip_spikes(v), "max_ratio"),
    "clip_spikes/decay": (lambda v: oc.clip_spikes(decay=v), "decay"),
    "spike_clipped": (lambda v: oc.spike_clipped(optax.sgd(0.1), max_ratio=v),
                      "max_ratio"),
    "clip_update_rms": (lambda v: oc.clip_update_rms(optax.adam(0.1), eps=v),
                        "eps"),
    "clip_update_rms/decay": (lambda v: oc.clip_update_rms(
        optax.adam(0.1), decay=v), "decay"),
    "clip_update_by_history": (lambda v: oc.clip_update_by_history(
        num_std=v), "num_std"),
    "clip_update_by_history/std_floor": (
        lambda v: oc.clip_update_by_history(std_floor=v), "std_floor"),
    "skip_step": (lambda v: oc.skip_step(optax.sgd(0.1), skip_norm=v),
                  "skip_norm"),
    "skip_step/SpikeEMA": (lambda v: oc.skip_step(
        optax.sgd(0.1), rule=oc.SpikeEMA(max_ratio=v)), "max_ratio"),
    "per_example_clip": (lambda v: _per_example_clip(v), CLIP),
    "per_example_clip/ExampleClip": (
        lambda v: _per_example_clip(oc.ExampleClip(v)), "max_norm"),
    "clipped_grad": (lambda v: oc.clipped_grad(lambda w, x: w * x, clip=v),
                     CLIP),
    "dp_aggregate": (lambda v: oc.dp_aggregate(v, 1.0, key=0), CLIP),
    "per_example_clip/automatic": (lambda v: _per_example_clip(
        oc.ExampleClip(1.0, automatic=v)), "automatic"),
    "clipped_grad/automatic": (lambda v: oc.clipped_grad(
        lambda w, x: w * x, clip=oc.ExampleClip(1.0, automatic=v)),
                               "automatic"),
    "dp_aggregate/automatic": (lambda v: oc.dp_aggregate(
        oc.ExampleClip(1.0, automatic=v), 1.0, key=0), "automatic"),
    "quantile_norm": (lambda v: oc.quantile_norm(v), "initial"),
    "qk_clip": (lambda v: oc.qk_clip(v), "max_logit"),
    "qk_clip/query_exponent": (lambda v: oc.qk_clip(query_exponent=v),
                               "query_exponent"),
    "clip_by_spectral_norm": (lambda v: oc.clip_by_spectral_norm(v),
                              "max_norm"),
    "clip_by_spectral_norm/ns_steps": (
        lambda v: oc.clip_by_spectral_norm(1.0, ns_steps=v), "ns_steps"),
    "dynamic_loss_scale": (lambda v: oc.dynamic_loss_scale(
        optax.sgd(0.1), init_scale=v), "init_scale"),
    "dynamic_loss_scale/growth_factor": (lambda v: oc.dynamic_loss_scale(
        optax.sgd(0.1), growth_factor=v), "growth_factor"),
    "dynamic_loss_scale/backoff_factor": (lambda v: oc.dynamic_loss_scale(
        optax.sgd(0.1), backoff_factor=v), "backoff_factor"),
    "dynamic_loss_scale/growth_interval": (lambda v: oc.dynamic_loss_scale(
        optax.sgd(0.1), growth_interval=v), "growth_interval"),
    "dynamic_loss_scale/min_scale": (lambda v: oc.dynamic_loss_scale(
        optax.sgd(0.1), min_scale=v), "min_scale"),
}
# None is documented there: no cap, no limit, the optimizer's own eps and
# decay, no automatic clipping.
NONE_IS_DOCUMENTED = {"zclip/max_norm", "skip_step", "clip_update_rms",
                      "clip_update_rms/decay", "per_example_clip/automatic",
                      "clipped_grad/automatic", "dp_aggregate/automatic"}

FLAGS = {
    "clip_by_global_norm": lambda v: oc.clip_by_global_norm(1.0, leaf_norms=v),
    "clip_by_norm": lambda v: oc.clip_by_norm(1.0, leaf_norms=v),
    "clip_by_value": lambda v: oc.clip_by_value(1.0, full_stats=v),
    "adaptive_grad_clip": lambda v: oc.adaptive_grad_clip(0.1, leaf_norms=v),
    "clip_by_quantile": lambda v: oc.clip_by_quantile(leaf_norms=v),
    "zclip": lambda v: oc.zclip(leaf_norms=v),
    "clip_update_rms": lambda v: oc.clip_update_rms(optax.adam(0.1),
                                                    leaf_norms=v),
    "clip_update_by_history": lambda v: oc.clip_update_by_history(
        leaf_norms=v),
    "skip_step": lambda v: oc.skip_step(optax.sgd(0.1), nonfinite=v),
    "check_finite": lambda v: oc.check_finite(callback=v),
    "clip_by_spectral_norm": lambda v: oc.clip_by_spectral_norm(1.0, soft=v),
    "clip_by_spectral_norm/leaf_norms": lambda v: oc.clip_by_spectral_norm(
        1.0, leaf_norms=v),
    "zclip/follow": lambda v: oc.zclip(oc.ZScore(follow=v)),
    "adagc/follow": lambda v: oc.adagc(follow=v),
    "clip_by_quantile/follow": lambda v: oc.clip_by_quantile(follow=v),
    "skip_step/SpikeEMA.follow": lambda v: oc.skip_step(
        optax.sgd(0.1), rule=oc.SpikeEMA(follow=v)),
}


def _run(out):
  """One update of a built transform on G, traced but not compiled (a no-op
  for other results): errors of the first trace surface, at no compile."""
  if isinstance(out, optax.GradientTransformation):
    jax.eval_shape(out.update, G, out.init(G), G)
  return out


def test_the_tables_cover_every_public_function():
  functions = {n for n in oc.__all__ if n[0].islower()}
  covered = {k.split("/")[0] for k in (*THRESHOLDS, *FLAGS)} | {
      "global_norm", "clip_stats", "raise_if_nonfinite", "dp_noise",
      "check_finite", "max_logit_attention", "gather_max_logits",
      "layer_axes", "norm_parts", "loss_scale", "adopt_state"}
  assert functions <= covered, sorted(functions - covered)


@pytest.mark.parametrize("bad, error", [
    (-1.0, ValueError), (NAN, ValueError), ("1.0", TypeError),
    (True, TypeError), ([1.0], TypeError), (jnp.ones(2), ValueError),
    (lambda: 1.0, TypeError), (None, TypeError)])
@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_bad_thresholds_name_the_argument(name, bad, error):
  build, arg = THRESHOLDS[name]
  if bad is None and name in NONE_IS_DOCUMENTED:
    _run(build(bad))
    return
  if isinstance(bad, list) and name == "clip_by_value":
    pytest.skip("a list is a pytree prefix of thresholds for clip_by_value")
  with pytest.raises((error, TypeError, ValueError)) as e:
    _run(build(bad))
  assert re.search(arg, str(e.value)), str(e.value)


@pytest.mark.parametrize("bad", [1, "yes", None, jnp.array(True)])
@pytest.mark.parametrize("name", sorted(FLAGS))
def test_flags_must_be_bools(name, bad):
  with pytest.raises(TypeError, match="True or False"):
    FLAGS[name](bad)


# An old keyword (or value) of 0.3 and the replacement its error names.
RENAMED = {
    "clip_by_global_norm(where=)": (
        lambda: oc.clip_by_global_norm(1.0, where=True), "mask="),
    "clip_by_value(stats=)": (
        lambda: oc.clip_by_value(1.0, stats=True), "full_stats="),
    "clip_by_value(min_value positional)": (
        lambda: oc.clip_by_value(1.0, -1.0), "positional"),
    "clip_by_quantile(history=)": (
        lambda: oc.clip_by_quantile(history=4), "window="),
    "zclip(alpha=)": (lambda: oc.zclip(alpha=0.9), r"ZScore\(decay="),
    "zclip(z_thresh=)": (lambda: oc.zclip(z_thresh=2.0),
                         r"ZScore\(num_std="),
    "zclip(warmup_steps=)": (lambda: oc.zclip(warmup_steps=3),
                             r"ZScore\(warmup_steps="),
    "zclip(std_floor=)": (lambda: oc.zclip(std_floor=0.1),
                          r"ZScore\(std_floor="),
    "zclip(mode=)": (lambda: oc.zclip(mode="mean"), r"ZScore\(mode="),
    "zclip(eps=)": (lambda: oc.zclip(eps=1e-6), "std_floor"),
    "zclip(skip_update_on_spike=)": (
        lambda: oc.zclip(skip_update_on_spike=True), "oc.skip_step"),
    "adagc(lambda_rel=)": (lambda: oc.adagc(lambda_rel=1.1), "max_ratio="),
    "adagc(beta=)": (lambda: oc.adagc(beta=0.9), "decay="),
    "adagc(lambda_abs=)": (lambda: oc.adagc(lambda_abs=1.0), "max_norm="),
    "clip_spikes(theta=)": (lambda: oc.clip_spikes(theta=1.0), "max_ratio="),
    "clip_spikes(beta2=)": (lambda: oc.clip_spikes(beta2=0.9), "decay="),
    "clip_spikes(inner=)": (
        lambda: oc.clip_spikes(inner=optax.sgd(0.1)), "oc.spike_clipped"),
    "clip_update_rms(b2=)": (
        lambda: oc.clip_update_rms(optax.adam(0.1), b2=0.999), "decay="),
    "clip_update_by_history(sigma=)": (
        lambda: oc.clip_update_by_history(sigma=1.0), "num_std="),
    "clip_update_by_history(min_std=)": (
        lambda: oc.clip_update_by_history(min_std=1.0), "std_floor="),
    "skip_step(max_norm=)": (
        lambda: oc.skip_step(optax.sgd(0.1), max_norm=1.0), "skip_norm="),
    "skip_step(spike_factor=)": (
        lambda: oc.skip_step(optax.sgd(0.1), spike_factor=5.0),
        r"SpikeEMA\(max_ratio="),
    "skip_step(spike_window=)": (
        lambda: oc.skip_step(optax.sgd(0.1), spike_window=oc.SpikeWindow()),
        "rule="),
    "per_example_clip(max_norm=)": (
        lambda: oc.per_example_clip(G, max_norm=1.0), "clip="),
    "per_example_clip(automatic=)": (
        lambda: oc.per_example_clip(G, 1.0, automatic=0.01),
        r"ExampleClip\(max_norm, automatic="),
    "clipped_grad(max_norm=)": (
        lambda: oc.clipped_grad(lambda w, x: w * x, max_norm=1.0), "clip="),
    "clipped_grad(normalize=)": (
        lambda: oc.clipped_grad(lambda w, x: w * x, clip=1.0, normalize=True),
        r"ExampleClip\(max_norm, normalize="),
    "clipped_grad(return_norms=)": (
        lambda: oc.clipped_grad(lambda w, x: w * x, clip=1.0,
                                return_norms=True), "PerExampleInfo"),
    "dp_aggregate(seed=)": (lambda: oc.dp_aggregate(1.0, 1.0, seed=0),
                            "key="),
    "dp_noise(seed=)": (lambda: oc.dp_noise(1.0, seed=0), "key="),
    "dp_noise(max_norm=)": (
        lambda: oc.dp_noise(1.0, key=0, max_norm=oc.quantile_norm()),
        "adaptive_norm="),
    "qk_clip(tau=)": (lambda: oc.qk_clip(tau=1.0), "max_logit="),
    "qk_clip(alpha=)": (lambda: oc.qk_clip(alpha=0.5), "query_exponent="),
}


@pytest.mark.parametrize("name", sorted(RENAMED))
def test_an_old_keyword_names_its_replacement(name):
  make, replacement = RENAMED[name]
  with pytest.raises(TypeError, match=replacement):
    make()


def test_spike_window_watch_grad_norm_names_norm():
  tx = oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow(watch="norm"))
  _run(tx)
  with pytest.raises(ValueError, match="watch='norm'"):
    oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow(watch="grad_norm"))


@settings(max_examples=25, deadline=None)
@given(st.floats(max_value=-1e-30) | st.just(NAN))
def test_negative_or_nan_global_threshold_at_construction(value):
  with pytest.raises(ValueError, match="max_norm"):
    oc.clip_by_global_norm(value)


@jax.jit
def _clip_by_scheduled_value(value):
  """clip_by_global_norm with a schedule returning ``value``, known only at
  run time (traced here: one compile for every value)."""
  tx = oc.clip_by_global_norm(lambda count: value)
  return tx.update(G, tx.init(G))


@settings(max_examples=25, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_run_time_threshold_never_flips_or_poisons(value):
  # A schedule's value is only known at run time: clamped, never a sign flip
  # or a NaN of ours.
  updates, state = _clip_by_scheduled_value(jnp.float32(value))
  for leaf in jax.tree_util.tree_leaves(updates):
    assert np.all(np.isfinite(leaf))
  assert np.all(np.asarray(updates["w"]) * np.asarray(G["w"]) >= 0)
  assert float(state.stats.threshold) >= 0


# ----------------------------------------------------------------------------
# Gradient trees.


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_global_norm(1.0), lambda: oc.clip_by_norm(1.0),
    lambda: oc.clip_by_value(1.0),
    lambda: oc.zclip(oc.ZScore(warmup_steps=1)),
    lambda: oc.clip_by_quantile(window=4), lambda: oc.adagc(warmup_steps=1),
    lambda: oc.skip_step(optax.sgd(1.0)),
    lambda: oc.clip_update_rms(optax.adam(1.0)),
    lambda: oc.clip_update_by_history(window=2)])
@pytest.mark.slow
def test_a_python_number_as_the_gradient(make):
  tx = make()
  updates, _ = tx.update(5.0, tx.init(5.0), 5.0)
  assert np.ndim(updates) == 0 and np.isfinite(float(updates))
  assert float(oc.global_norm(-5.0)) == 5.0


def test_integer_leaves_are_named():
  with pytest.raises(TypeError, match=r"\['n'\]"):
    oc.clip_by_global_norm(1.0).init({"n": jnp.arange(3), "w": jnp.ones(2)})


@pytest.mark.parametrize("axis", ["x", 1.5, (0, "a")])
def test_axis_of_the_wrong_type(axis):
  with pytest.raises(TypeError, match="axis"):
    _run(oc.clip_by_norm(1.0, axis=axis))


def test_quantile_per_leaf_rejects_a_changed_tree():
  # The history is per leaf: a 5000x spike in leaf b must not be judged by
  # leaf a's threshold.
  tx = oc.clip_by_quantile(0.5, window=4, per_leaf=True)
  state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="per_leaf=True"):
    tx.update({"b": jnp.ones(3), "c": jnp.ones(2)}, state)


@pytest.mark.parametrize("make", [
    oc.clip_spikes, lambda: oc.spike_clipped(optax.adam(1e-3))],
                         ids=["clip_spikes", "spike_clipped"])
@pytest.mark.parametrize("bad, match", [
    ({"a": jnp.ones(4), "b": jnp.ones(2)}, r"leaf \['a'\] has shape \(4,\)"),
    ({"a": jnp.ones(3)}, "differs from the tree init was given")])
def test_clip_spikes_given_a_changed_tree(make, bad, match):
  tx = make()
  state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=match):
    tx.update(bad, state, bad)


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_global_norm(1.0), lambda: oc.clip_by_norm(1.0),
    lambda: oc.zclip(), lambda: oc.clip_spikes(),
    lambda: oc.spike_clipped(optax.adam(1e-3)),
    lambda: oc.clip_by_spectral_norm(1.0),
    lambda: oc.dynamic_loss_scale(optax.sgd(0.1))])
@pytest.mark.parametrize("wrong", [optax.EmptyState(), None, "other"])
def test_a_state_of_another_transformation(make, wrong):
  tx = make()
  tx.init(G)
  if wrong == "other":  # A look-alike: it has the same first fields.
    wrong = oc.clip_by_value(1.0).init(G)
  with pytest.raises(TypeError, match="state its own init returned"):
    tx.update(G, wrong, G)


# ----------------------------------------------------------------------------
# layer_axis: the axis that stacks a leaf's layers.

STACKED = {"blocks": jnp.ones((3, 2, 2)), "head": jnp.ones(2)}
LAYER_AXIS = {
    "clip_by_global_norm": lambda v: oc.clip_by_global_norm(
        1.0, leaf_norms=True, layer_axis=v),
    "clip_by_norm": lambda v: oc.clip_by_norm(1.0, layer_axis=v),
    "adaptive_grad_clip": lambda v: oc.adaptive_grad_clip(0.1, layer_axis=v),
    "adagc": lambda v: oc.adagc(layer_axis=v),
    "clip_by_quantile": lambda v: oc.clip_by_quantile(per_leaf=True,
                                                      layer_axis=v),
    "zclip": lambda v: oc.zclip(leaf_norms=True, layer_axis=v),
    "skip_step": lambda v: oc.skip_step(optax.sgd(0.1), leaf_norms=True,
                                        layer_axis=v),
}


@pytest.mark.parametrize("bad, error, match", [
    ("blocks", TypeError, "layer_axis"), (1.5, TypeError, "layer_axis"),
    (True, TypeError, "layer_axis"), ({"blocks": "0"}, TypeError,
                                      r"layer_axis\['blocks'\]"),
    (jnp.zeros(()), TypeError, "layer_axis"),
    (3, ValueError, r"layer_axis=3 does not fit .*\['blocks'\]"),
    ({"blocks": 0, "head": -2}, ValueError, r"\['head'\] of shape \(2,\)"),
    ({"blocks": 0}, ValueError, "layer_axis tree does not match"),
    ({"blocks": 0, "head": None, "extra": 0}, ValueError,
     "layer_axis tree does not match")])
@pytest.mark.parametrize("name", sorted(LAYER_AXIS))
def test_bad_layer_axis_is_named(name, bad, error, match):
  with pytest.raises(error, match=match):
    tx = LAYER_AXIS[name](bad)
    tx.update(STACKED, tx.init(STACKED), STACKED)


def test_clip_spikes_takes_no_layer_axis():
  # Its rule is per element and its statistics are global: nothing to split.
  with pytest.raises(TypeError, match="layer_axis"):
    oc.clip_spikes(layer_axis=0)  # type: ignore[call-arg]
  with pytest.raises(TypeError, match="layer_axis"):
    oc.spike_clipped(optax.sgd(0.1), layer_axis=0)  # type: ignore[call-arg]


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_norm(1.0, axis=(0, 2), layer_axis=0),
    lambda: oc.adaptive_grad_clip(0.1, axis=-3, layer_axis=0)])
def test_a_unit_axis_that_is_the_layer_axis(make):
  tx = make()
  with pytest.raises(ValueError, match="layer axis"):
    tx.update(STACKED, tx.init(STACKED), STACKED)


def test_layer_axes_careless_inputs():
  # Any parameter tree is read (NNX, linen, Equinox, plain); what cannot be
  # read is named with the model's own keys and the call that fixes it.
  from flax import nnx
  with pytest.raises(ValueError, match=r"no record of a stacking axis"
                     r" \(blocks\).*'blocks'"):
    oc.layer_axes({"blocks": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"'blocks' \(3 layers\).*"
                     r"oc.layer_axes\(model, stacked='blocks'\)"):
    oc.layer_axes({"blocks": {"k": jnp.ones((3, 2, 2)), "b": jnp.ones(
        (3, 2))}, "head": jnp.ones(2)})
  layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="name must be a string"):
    oc.layer_axes(layer, name=0)
  with pytest.raises(ValueError, match="no record of a stacking axis"
                     r" \(bias, kernel\)"):
    oc.layer_axes(layer)
  for bad in (5, ["kernel", 1], ""):
    with pytest.raises(TypeError, match="stacked"):
      oc.layer_axes(layer, stacked=bad)
  with pytest.raises(TypeError, match=r"stacked\['kernel'\] must be an int"):
    oc.layer_axes(layer, stacked={"kernel": "0"})
  with pytest.raises(ValueError, match="stacked='nope' names no parameter"
                     ".*'bias', 'kernel'"):
    oc.layer_axes(layer, stacked="nope")
  with pytest.raises(ValueError, match="no parameters"):
    oc.layer_axes({}, stacked="blocks")
  with pytest.raises(ValueError, match=r"kernel of shape \(2, 2\), which has"
                     " no axis 5"):
    oc.layer_axes(layer, stacked={"kernel": 5})
  assert oc.layer_axes({}) == {}  # No parameters: nothing stacked.
  assert oc.layer_axes(layer, stacked="kernel") == nnx.State(
      {"bias": None, "kernel": 0})


# ----------------------------------------------------------------------------
# The state utilities and the mergeable norm.


def test_norm_parts_careless_inputs():
  for bad in (0, -1.0, NAN, "l2", None, True):
    with pytest.raises((TypeError, ValueError), match="ord"):
      oc.norm_parts(G, ord=bad)
  for bad in (1, "yes", jnp.array(True), {}, [1.0]):
    with pytest.raises((TypeError, ValueError), match="mask"):
      oc.norm_parts(G, mask=bad)
  with pytest.raises(ValueError, match="mask tree does not match"):
    oc.norm_parts(G, mask={"w": True})
  for bad in ("1", jnp.ones(2), [1.0], True):
    with pytest.raises(TypeError, match="peak must be a scalar"):
      oc.norm_parts(G, peak=bad)
  with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
    oc.norm_parts({"n": jnp.arange(3)})
  parts = oc.NormParts(jnp.float32(1.0), jnp.zeros(12, jnp.int32), 2.0, 1)
  with pytest.raises(TypeError, match="merge with another NormParts"):
    parts + 1.0  # noqa: B018
  with pytest.raises(ValueError, match="share one ord"):
    parts + oc.NormParts(parts.peak, parts.limbs, 1.0, 1)  # noqa: B018
  # Defined results (one compile): no elements give 0, a NaN element NaN,
  # a negative agreed peak is no larger than this tree's own.
  empty, none, nan, peaked = jax.jit(lambda g, v: (
      oc.norm_parts({}).norm(), oc.norm_parts(None).norm(),
      oc.norm_parts(v).norm(), oc.norm_parts(g, peak=-1.0).norm()))(
          G, {"w": jnp.array([NAN, 1.0])})
  assert float(empty) == 0.0 and float(none) == 0.0 and np.isnan(nan)
  np.testing.assert_allclose(float(peaked), np.linalg.norm([3, 4, 1, 1, 2]),
                             rtol=1e-6)


def test_loss_scale_and_adopt_state_careless_inputs():
  adam = optax.adam(0.1)
  state = adam.init(G)
  for wrong in (None, state, adam):
    with pytest.raises(ValueError, match="no dynamic_loss_scale state"):
      oc.loss_scale(wrong)
  with pytest.raises(ValueError, match="min_scale=4.0 exceeds init_scale"):
    oc.dynamic_loss_scale(adam, init_scale=2.0, min_scale=4.0)
  with pytest.raises(TypeError, match="inner must be an optax"):
    oc.dynamic_loss_scale(lambda g: g)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match="opt_state is an optimizer"):
    oc.adopt_state(adam, init_state=state)
  with pytest.raises(TypeError, match="init_state is an optimizer"):
    oc.adopt_state(state, init_state=adam)
  with pytest.raises(TypeError, match="positional"):
    oc.adopt_state(state, state)  # type: ignore[misc]
  with pytest.raises(ValueError, match="no part of opt_state fits"):
    oc.adopt_state(adam.init({"x": jnp.ones(5)}), init_state=state)
  # Nothing to carry over: the fresh state, as init gave it.
  for empty in (None, (), optax.EmptyState()):
    out = oc.adopt_state(empty, init_state=state)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
        state)


# ----------------------------------------------------------------------------
# The cases that were silently wrong.


def test_adagc_exact_beyond_float32():
  g = {"w": jnp.full(16, 1e38)}
  tx = oc.adagc()
  updates, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(updates["w"], np.full(16, 0.25), rtol=1e-6)
  want, _ = oc.clip_by_global_norm(1.0).update(g, oc.clip_by_global_norm(
      1.0).init(g))
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
  assert bool(state.stats.clipped)


@pytest.mark.parametrize("make", [
    lambda s: oc.clip_by_global_norm(s), lambda s: oc.clip_by_norm(s),
    lambda s: oc.adaptive_grad_clip(s)])
def test_a_schedule_must_return_a_scalar(make):
  tx = make(lambda count: jnp.ones(2))
  g = {"w": jnp.ones(1)}
  with pytest.raises(ValueError, match="scalar"):
    tx.update(g, tx.init(g), g)


def test_skip_step_spike_max_ratio_below_one_is_refused():
  with pytest.raises(ValueError, match="max_ratio"):
    oc.skip_step(optax.sgd(0.1), rule=oc.SpikeEMA(max_ratio=0.5))


def test_zclip_after_identical_norms_is_not_fooled_by_rounding():
  tx = oc.zclip(oc.ZScore(warmup_steps=3))
  g = jnp.ones(4)
  state = tx.init(g)
  for _ in range(10):
    _, state = tx.update(g, state)
  updates, state = tx.update(g * 1.001, state)
  assert not bool(state.spike) and float(state.z) < 1
  np.testing.assert_array_equal(updates, g * 1.001)
  _, state = tx.update(g * 1.5, state)  # A real spike still is one.
  assert bool(state.spike)


def test_agc_counts_a_unit_zeroed_by_a_nan_parameter():
  tx = oc.adaptive_grad_clip(0.1)
  params = {"w": jnp.array([[NAN, 1.0], [1.0, 1.0]])}
  grads = {"w": jnp.array([[1.0, 0.01], [1.0, 0.01]])}
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"][:, 0], [0.0, 0.0])
  np.testing.assert_array_equal(updates["w"][:, 1], grads["w"][:, 1])
  assert bool(state.stats.clipped) and int(state.stats.num_clipped) == 1
  assert float(state.stats.frac_clipped) == 0.5  # The zeroed unit of two.


def test_raise_if_nonfinite_needs_a_check_finite_state():
  adam = optax.adam(0.1)
  for state in (adam.init(G), None):
    with pytest.raises(ValueError, match="check_finite"):
      oc.raise_if_nonfinite(state)
  opt = oc.check_finite(callback=False)
  with pytest.raises(TypeError, match="jax.jit"):
    jax.jit(oc.raise_if_nonfinite)(opt.init(G))


class MyClipState(NamedTuple):
  """A state class of one's own: found by its ClipStats, named by its class."""
  stats: oc.ClipStats
  budget: jax.Array


class LookAlikeState(NamedTuple):
  """The fields of a ClipStats, but no ClipStats: not a clipping state."""
  count: jax.Array
  norm: jax.Array


def test_clip_stats_finds_states_by_type():
  # No registry: a state holding a ClipStats is found by its type, named by
  # stats_name or its class name; nothing else is.
  assert not hasattr(oc, "register_state")
  for state in (optax.adam(0.1).init(G), None,
                LookAlikeState(jnp.zeros((), jnp.int32), jnp.ones(()))):
    with pytest.raises(ValueError, match="found no optaxclip transform"):
      oc.clip_stats(state)
  mine = MyClipState(oc.ClipStats(count=jnp.ones((), jnp.int32),
                                  norm=jnp.float32(2.0)), jnp.float32(0.5))
  stats = oc.clip_stats((mine, oc.clip_by_global_norm(1.0).init(G)))
  assert {k for k in stats if k.startswith("my_clip/")} == {
      "my_clip/count", "my_clip/norm", "my_clip/budget"}
  assert float(stats["my_clip/budget"]) == 0.5
  assert "clip_by_global_norm/norm" in stats
  assert "clip_by_global_norm/grad_norm" not in stats
  MyClipState.stats_name = "mine"
  try:
    assert set(oc.clip_stats(mine)) == {"mine/count", "mine/norm",
                                        "mine/budget"}
  finally:
    del MyClipState.stats_name


def _loss3(w, x, y):
  return 0.5 * jnp.mean((x * y - w) ** 2)


_X3, _Y3 = jnp.array([0.0, 7.0, 2.5]), jnp.array([1.0, 2.0, 3.0])


@functools.cache
def _clipped_grad_of_x_and_y():
  return oc.clipped_grad(_loss3, clip=2.0, batch_argnums=(1, 2))(
      3.0, _X3, _Y3)


@pytest.mark.parametrize("batch_argnums", [(1, -1), (-2, -1), (1, 2)])
def test_clipped_grad_negative_batch_argnums(batch_argnums):
  got = oc.clipped_grad(_loss3, clip=2.0, batch_argnums=batch_argnums)(
      3.0, _X3, _Y3)
  want = _clipped_grad_of_x_and_y()
  assert len(got) == 2 and isinstance(got[1], oc.PerExampleInfo)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_clipped_grad_argument_numbers_are_checked():
  with pytest.raises(ValueError, match="batch_argnums"):
    oc.clipped_grad(lambda w, x: w * x, clip=1.0, batch_argnums=())
  with pytest.raises(ValueError, match="batch_argnums"):
    oc.clipped_grad(lambda w, x: w * x, clip=1.0, batch_argnums=3)(
        1.0, jnp.ones(2))


@pytest.mark.parametrize("bad", [1, "yes", jnp.array(True), {}, [1.0],
                                 {"w": True, "b": None}])
def test_global_clip_mask_takes_bools(bad):
  # {"w": True, "b": None}: None is an empty subtree, so it is no prefix of G.
  with pytest.raises((TypeError, ValueError), match="mask"):
    _run(oc.clip_by_global_norm(1.0, mask=bad))


@pytest.mark.parametrize("gamma", [0.0, 1e-45, INF])
def test_automatic_clipping_gamma_must_be_positive_and_finite(gamma):
  with pytest.raises(ValueError, match="automatic"):
    oc.per_example_clip(G, oc.ExampleClip(1.0, automatic=gamma))


@pytest.mark.parametrize("t, gamma", [(INF, 0.01), (1e37, 0.01),
                                      (10.0, 2e-38)])
def test_automatic_clipping_refuses_unbounded_weights(t, gamma):
  # Automatic clipping scales every example by t / (norm + gamma): inf is
  # not "no clipping" there, and t / gamma must stay within float32.
  with pytest.raises(ValueError, match="max_norm"):
    oc.clipped_grad(lambda w, x: w * x,
                    clip=oc.ExampleClip(t, automatic=gamma))


def _loss2(w, x):
  return 0.5 * jnp.mean((x - w) ** 2)


# Built and compiled once; the cases differ in the run-time threshold only.
_AUTOMATIC = jax.jit(oc.clipped_grad(
    _loss2, clip=oc.ExampleClip(2.0, automatic=0.01)))
_NORMALIZE = jax.jit(oc.clipped_grad(
    _loss2, clip=oc.ExampleClip(2.0, normalize=True)))


@pytest.mark.parametrize("t", [0.0, NAN, -1.0, INF])
def test_automatic_clipping_with_a_bad_run_time_threshold_adds_nothing(t):
  total, info = _AUTOMATIC(3.0, jnp.array([0.0, 7.0, 3.0]),
                           max_norm=jnp.float32(t))
  assert float(total) == 0.0
  assert float(info.sensitivity) == 0.0 and float(info.threshold) == 0.0


@pytest.mark.parametrize("t", [0.0, NAN, -1.0])
def test_normalize_with_a_run_time_threshold_of_zero(t):
  total, info = _NORMALIZE(3.0, jnp.array([0.0, 7.0, 2.5]),
                           max_norm=jnp.float32(t))
  assert float(total) == 0.0
  assert float(info.sensitivity) == 1.0 and float(info.threshold) == 0.0


def test_a_hand_built_quantile_norm_is_checked():
  bad = oc.QuantileNorm(1.0, 7.0, 0.2, 0.0)
  with pytest.raises(ValueError, match="target_quantile"):
    oc.dp_aggregate(bad, 1.0, key=0)
  with pytest.raises(ValueError, match="target_quantile"):
    oc.dp_aggregate(oc.ExampleClip(bad), 1.0, key=0)
  with pytest.raises(ValueError, match="target_quantile"):
    oc.dp_noise(1.0, key=0, adaptive_norm=bad)


@pytest.mark.slow
def test_vmap_differentiates_only_the_params_of_a_module():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
      self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(self.norm(self.linear(x)))

  model = Net(nnx.Rngs(0))
  model.norm.mean.value = jnp.full((4,), 0.3)  # Batch statistics of note.
  x = jax.random.normal(jax.random.key(1), (5, 3))

  def loss(m, x):
    return jnp.mean(m(x) ** 2)

  got, info = oc.clipped_grad(loss, clip=0.5)(model, x)
  assert {type(v) for v in jax.tree_util.tree_leaves(
      got, is_leaf=lambda v: isinstance(v, nnx.Variable))} == {nnx.Param}
  _, params, rest = nnx.split(model, nnx.Param, ...)
  norms = []
  for i in range(5):
    g = jax.grad(lambda p, xi: loss(nnx.merge(nnx.graphdef(model), p, rest),
                                    xi))(params, x[i:i + 1])
    norms.append(float(oc.global_norm(g)))
  np.testing.assert_allclose(info.norms, norms, rtol=1e-5)
  ghost, ghost_info = oc.clipped_grad(loss, clip=0.5, method="ghost")(model,
                                                                      x)
  np.testing.assert_allclose(ghost_info.norms, norms, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(ghost)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


class _Noisy:
  """A model whose training mode updates state: BatchNorm, then Dropout."""

  @staticmethod
  def make(layer):
    from flax import nnx

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.mid = layer(rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs)

      def __call__(self, x, rngs=None):
        h = self.linear(x)
        h = self.mid(h, rngs=rngs) if rngs is not None else self.mid(h)
        return self.out(h)

    return Net(nnx.Rngs(0))


@pytest.mark.parametrize("method", ["vmap", "ghost"])
@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_a_module_updating_its_own_state_is_explained(layer, method):
  from flax import nnx
  make = {"batchnorm": lambda r: nnx.BatchNorm(4, rngs=r),
          "dropout": lambda r: nnx.Dropout(0.5, rngs=r)}[layer]
  model = _Noisy.make(make)
  model.train()
  x = jnp.ones((4, 3))
  fn = oc.clipped_grad(lambda m, x: jnp.mean(m(x) ** 2), clip=1.0,
                       method=method)
  with pytest.raises(ValueError, match="model.eval\\(\\).*one key per example"):
    fn(model, x)


@pytest.mark.slow
def test_dropout_with_one_key_per_example():
  from flax import nnx
  model = _Noisy.make(lambda r: nnx.Dropout(0.5))
  model.train()
  x = jax.random.normal(jax.random.key(1), (4, 3))
  keys = jax.random.split(jax.random.key(2), 4)

  def loss(m, x, k):
    return jnp.mean(m(x, rngs=nnx.Rngs(dropout=k[0])) ** 2)

  got = {m: oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2),
                            method=m)(model, x, keys)[0]
         for m in ("vmap", "ghost")}
  _, params, rest = nnx.split(model, nnx.Param, ...)
  want = None
  def one(p, xi, ki):
    return loss(nnx.merge(nnx.graphdef(model), p, rest), xi, ki)

  for i in range(4):  # Each example with its own mask, clipped by hand.
    g = jax.grad(one)(params, x[i:i + 1], keys[i:i + 1])
    g = jax.tree_util.tree_map(
        functools.partial(jnp.multiply, min(1.0, 0.5 / float(
            oc.global_norm(g)))), g)
    want = g if want is None else jax.tree_util.tree_map(jnp.add, want, g)
  for m in got:
    for a, b in zip(jax.tree_util.tree_leaves(got[m]),
                    jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: oc.clip_by_value(1.0),
                                  lambda: oc.clip_spikes()])
def test_complex_gradients_where_no_bound_exists(make):
  g = {"z": jnp.array([3 + 4j, 0j])}
  with pytest.raises(TypeError, match=r"\['z'\] is complex"):
    _run_on(make(), g)


@pytest.mark.parametrize("make", [lambda: oc.clip_by_norm(1.0),
                                  lambda: oc.clip_by_global_norm(1.0)])
def test_complex_gradients_use_the_modulus(make):
  g = {"z": jnp.array([3 + 4j, 0j])}
  updates, _ = _run_on(make(), g)
  np.testing.assert_allclose(updates["z"], [0.6 + 0.8j, 0j], rtol=1e-6)


def _run_on(tx, g):
  return tx.update(g, tx.init(g))


def test_skip_step_given_the_inner_state():
  opt = oc.skip_step(optax.adam(0.1))
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="inner_state"):
    opt.update(params, optax.adam(0.1).init(params), params)


@pytest.mark.parametrize("updates, match", [
    ({"w": jnp.ones(3), "b": jnp.ones(2)}, r"leaf \['w'\] has shape \(3,\), init's had \(2,\)"),
    ({"w": jnp.ones(2)}, r"leaves missing: \['b'\]"),
    ({"w": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(1)},
     r"leaves not in init's tree: \['c'\]"),
])
def test_skip_step_given_updates_unlike_the_params(updates, match):
  # Issue 20: gradients of another tree than the one given to init are
  # named, with the fix, before the inner optimizer fails on them.
  opt = oc.skip_step(optax.adam(0.1))
  params = {"w": jnp.ones(2), "b": jnp.ones(2)}
  state = opt.init(params)
  for update in (opt.update, jax.jit(opt.update)):
    with pytest.raises(ValueError, match=match + ".*call init again"):
      update(updates, state, params)


def test_dp_aggregate_without_a_batch_axis():
  tx = oc.dp_aggregate(1.0, 0.0, key=0)
  params = {"b": jnp.ones(3), "w": jnp.ones(2)}
  with pytest.raises(ValueError, match="per-example gradients"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("max_logit", [0.0, -0.0, jnp.float32(0.0)])
def test_qk_clip_max_logit_of_zero(max_logit):
  with pytest.raises(ValueError, match="max_logit=-?0.0 must be > 0"):
    oc.qk_clip(max_logit)


def test_qk_clip_without_max_logits_or_attention_modules():
  tx = optax.chain(optax.sgd(0.1), oc.qk_clip())
  with pytest.raises(ValueError, match="max_logits="):
    tx.update(G, tx.init(G), G)  # As _run would call it.
  with pytest.raises(ValueError, match="no leaf under 'query'"):
    tx.update(G, tx.init(G), G, max_logits=jnp.ones(2))


def test_gather_max_logits_of_a_tree_without_them():
  with pytest.raises(ValueError, match="no max logits"):
    oc.gather_max_logits({"w": jnp.ones(2)})
