"""Every global-norm transform with a norm computed elsewhere.

``update(updates, state, params, global_norm=norm)``: a number (as
``oc.global_norm`` gives it) leaves every update and state bit for bit as
the transformation's own computation; ``oc.NormParts`` of a whole model
passed to a transformation that holds only part of it (a pipeline stage)
gives that part exactly the updates one program holding the whole model
gives it. (``clip_by_global_norm``: tests/test_clipping.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

# Per step: plain, smaller, a spike, plain.
STEP_SCALES = (1.0, 0.5, 30.0, 1.0)
STAGE = ("w", "b")  # The leaves one stage holds; "e" is the other stage's.


def _grads():
  rng = np.random.default_rng(2)
  g = {"w": rng.normal(size=(6, 4)).astype(np.float32),
       "b": rng.normal(size=(4,)).astype(np.float32),
       "e": rng.normal(size=(5, 4)).astype(np.float32)}
  return {k: np.stack([v * s for s in STEP_SCALES]) for k, v in g.items()}


TRANSFORMS = {
    "zclip": lambda: oc.zclip(oc.ZScore(warmup_steps=2, num_std=1.0)),
    "adagc": lambda: oc.adagc(warmup_steps=2, max_norm=1.0),
    "clip_by_quantile": lambda: oc.clip_by_quantile(0.5, window=3),
    "skip_step": lambda: oc.skip_step(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)),
        skip_norm=20.0),
}


def _run(tx, grads, norms):
  """Every step's updates and the last state; ``norms(g, t)`` is the
  ``global_norm=`` of step ``t`` (or None: the transform's own)."""
  params = jax.tree.map(lambda x: jnp.ones_like(x[0]), grads)

  def step(state, xs):
    g, t = xs
    n = norms(g, t)
    extra = {} if n is None else {"global_norm": n}
    u, state = tx.update(g, state, params, **extra)
    return state, u

  steps = jnp.arange(len(STEP_SCALES))
  return jax.lax.scan(step, tx.init(params), (grads, steps))


def _equal(a, b, what):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_supplied_norm_gives_the_same_bits(name):
  grads = jax.tree.map(jnp.asarray, _grads())
  stage = {k: grads[k] for k in STAGE}

  @jax.jit
  def run(grads, stage):
    tx = TRANSFORMS[name]()
    own = _run(tx, grads, lambda g, t: None)
    as_float = _run(tx, grads, lambda g, t: oc.global_norm(g))
    # The whole model's parts, to the whole model and to one stage.
    whole = _run(tx, grads, lambda g, t: oc.norm_parts(g))

    def whole_parts(g, t):
      del g  # The stage's gradients: the norm is of the whole model's.
      return oc.norm_parts(jax.tree.map(lambda x: x[t], grads))

    staged = _run(tx, stage, whole_parts)
    return own, as_float, whole, staged

  own, as_float, whole, staged = run(grads, stage)
  if name != "adagc":  # adagc's own global norm combines its tensors' norms
    _equal(as_float, own, f"{name}: float norm: ")
  # One stage's updates are the whole model's, restricted to the stage.
  for k in STAGE:
    np.testing.assert_array_equal(staged[1][k], whole[1][k], err_msg=k)
  # The recorded norm is the whole model's, every step.
  want = np.sqrt([sum(np.sum(np.square(np.asarray(v[t], np.float64)))
                      for v in grads.values()) for t in range(4)])
  np.testing.assert_allclose(staged[0].stats.norm, want[-1], rtol=1e-6)
  np.testing.assert_allclose(own[0].stats.norm, want[-1], rtol=1e-6)
