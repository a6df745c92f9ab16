"""The pure train step: `train_step(state, batch) -> (state, metrics)`.

The model is rebuilt from its graph definition and the state's arrays inside the step, so
the step is a plain function of pytrees that `jax.jit` compiles once with explicit
shardings. Gradient accumulation is a scan over microbatches whose losses are normalised by
whole-batch target counts, so the summed gradient equals the full-batch gradient exactly. Each
microbatch's gradient is added into the sum where it is made (`model.accumulate`): a scanned
stack's backward loop adds each layer's into the sum's row, holding no stack-sized gradient of
its own.
Where the `data` mesh axis splits the batch, the scan runs in a shard_map over `data`: each
replica sums its own microbatches' gradients and the replicas' sums are added once a step
(`train.data_grad_sum=step`); left to the compiler (`microbatch`), every microbatch's gradient
is summed over `data` as it is made.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec

from mtp_jax import sharding
from mtp_jax.config import Config
from mtp_jax.model import Transformer, accumulate, transformer
from mtp_jax.model.moe import RouterBias
from mtp_jax.model.mtp import shift_left
from mtp_jax.train import losses

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: B x L int32


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # nnx.Param variables: what the optimizer updates
  router_bias: nnx.State  # RouterBias variables: moved by the sign rule, never by gradients
  opt_state: Any
  skipped_steps: jax.Array  # updates skipped for a non-finite loss, gradient or result, in all
  bad_streak: jax.Array  # ... and how many of the latest steps in a row were skipped


def build_model(cfg: Config, key: int | jax.Array = 0) -> Transformer:
  t = cfg.train
  return Transformer(
    cfg.model,
    rngs=nnx.Rngs(key),
    remat=t.remat,
    remat_save=t.remat_save,
    remat_offload=t.remat_offload,
    attention_chunk_len=t.attention_chunk_len,
    scan_layers=t.scan_layers,
  )


def split(model: Transformer):
  graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
  assert not jax.tree.leaves(rest), f"unexpected model state outside Param/RouterBias: {rest}"
  return graphdef, params, bias


def trained(cfg: Config, params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(trained, frozen) parameters: all of them and none, or with train.trainable=mtp the MTP
  modules' (`params.mtp`) and the rest (embedding, trunk, final norm, head)."""
  if cfg.train.trainable == "all":
    return params, nnx.State({})
  return nnx.split_state(params, lambda path, _: path[0] == "mtp", ...)


def init_optimizer(cfg: Config, tx: optax.GradientTransformation, params: nnx.State):
  """The optimizer state of a fresh start: over the trained parameters only."""
  return tx.init(trained(cfg, params)[0])


def make_init(cfg: Config, tx: optax.GradientTransformation):
  """PRNG key -> TrainState; jit it with out_shardings so the state is born sharded."""

  def init(key):
    _, params, bias = split(build_model(cfg, key))
    return new_state(params, bias, init_optimizer(cfg, tx, params))

  return init


def new_state(params, bias, opt_state) -> TrainState:
  """Step 0 with a fresh optimizer state: a new run's, or one starting from imported weights."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero, params=params, router_bias=bias, opt_state=opt_state, skipped_steps=zero, bad_streak=zero
  )


def graphdef_of(cfg: Config):
  return split(nnx.eval_shape(lambda: build_model(cfg)))[0]


def loss_fn(params, frozen, bias, graphdef, batch: Batch, denominators, cfg: Config, mtp_lambda, parts: int, acc=None):
  """Scalar loss for one part of the batch (normalised by whole-batch counts) and its sums;
  `params` are the trained parameters, `frozen` the rest (`trained`). The batch is computed in
  `parts` equal parts (microbatches, times data replicas where those sum their own): the
  balance and z-losses, means over a part, are divided by it, so that their sum is the mean.
  `acc`: a gradient accumulator of `params`' structure, or None; with one, the gradient with
  respect to `acc` is `acc` plus the parameters' (`model.accumulate`: each scanned stack adds
  its layers' gradients into `acc`'s rows in its backward loop)."""
  accs = {}
  if acc is not None:
    stacks = set(transformer.scanned(cfg.model, cfg.train.scan_layers))
    in_stack = lambda path, _: path[0] == "layers" and path[1] in stacks
    stacked, acc = nnx.split_state(acc, in_stack, ...)
    accs = dict(stacked["layers"]) if "layers" in stacked else {}
    stacked, params = nnx.split_state(params, in_stack, ...)
    params = nnx.merge_state(stacked, accumulate.into(params, acc))
  model: Transformer = nnx.merge(graphdef, nnx.merge_state(params, frozen), bias)
  out = model(batch["tokens"], batch["segment_ids"], batch["positions"], accs)
  targets, masks = losses.all_depth_targets(batch["tokens"], batch["segment_ids"], len(out.hidden))
  nll, hits = losses.head_losses(out.hidden, model.head_matrix(), targets, masks, cfg.train.loss_chunk_len)
  per_depth = nll / denominators
  loss = per_depth[0]
  if len(out.hidden) > 1:  # L = L_main + lambda / D * sum_k L_k (DeepSeek-V3 eq. 25)
    loss = loss + mtp_lambda * jnp.mean(per_depth[1:])
  aux = out.aux
  balance = sum((a.balance_loss for a in aux.values()), jnp.zeros(())) / parts
  z = sum((a.z_loss for a in aux.values()), jnp.zeros(())) / parts
  sums = {
    "nll": nll,
    "hits": hits,
    "balance_loss": balance,
    "z_loss": z,
    "load": {k: a.load for k, a in aux.items()},
    "dropped": {k: a.dropped for k, a in aux.items()},
  }
  return loss + balance + z, sums


def target_counts(batch: Batch, depth: int) -> jax.Array:
  """Targets per prediction depth (0: next token) in the batch, float32 [1 + depth]."""
  counts = [losses.depth_targets(batch["tokens"], batch["segment_ids"], d)[1].sum() for d in range(1 + depth)]
  return jnp.stack(counts).astype(jnp.float32)


def make_eval_step(cfg: Config, graphdef, mesh):
  """(state, batch) -> summed NLL, correct predictions and targets per depth, [1 + depth] each,
  and `agree` [depth]: positions where depth k's argmax equals the main model's k steps later.
  The batch runs in the train step's microbatches (train.grad_accum_steps), their sums added: an
  evaluation holds one microbatch's activations, as training does, so a batch that fits training
  only in parts fits evaluation, and its forward is the train step's (capacity buffers sized alike)."""
  accum = cfg.train.grad_accum_steps

  def sums_of(params, bias, batch: Batch) -> dict[str, jax.Array]:
    model: Transformer = nnx.merge(graphdef, params, bias)
    out = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    targets, masks = losses.all_depth_targets(batch["tokens"], batch["segment_ids"], len(out.hidden))
    nll, hits, tops = losses.head_eval(out.hidden, model.head_matrix(), targets, masks, cfg.train.loss_chunk_len)
    # Depth k at i and the main model at i + k both predict t_{i+1+k} (the same document under the mask).
    agree = [jnp.sum((tops[k] == shift_left(tops[0], k)) & masks[k]).astype(jnp.float32) for k in range(1, len(tops))]
    agree = jnp.stack(agree) if agree else jnp.zeros((0,), jnp.float32)
    counts = jnp.stack([m.sum().astype(jnp.float32) for m in masks])
    return {"nll": nll, "hits": hits, "targets": counts, "agree": agree}

  def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    with sharding.activate(mesh, cfg.mesh.rules):
      if accum == 1:
        return sums_of(state.params, state.router_bias, batch)

      def add(total, mb):
        return jax.tree.map(jnp.add, total, sums_of(state.params, state.router_bias, mb)), None

      mbs = microbatches(batch, accum)
      shapes = jax.eval_shape(sums_of, state.params, state.router_bias, jax.tree.map(lambda x: x[0], mbs))
      return jax.lax.scan(add, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mbs)[0]

  return eval_step


def microbatches(batch: Batch, accum: int) -> Batch:
  """The batch as `accum` microbatches, stacked on a new leading axis: microbatch j takes rows
  j, j + accum, ..., so the batch-sharded axis stays whole (each device's rows stay its own)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def eval_metrics(sums: dict) -> dict[str, float]:
  """Summed eval outputs -> eval/ntp_loss, eval/ntp_acc, and per depth k eval/mtp_loss_k,
  eval/mtp_acc_k and eval/mtp_agree_k (the share of depth k's targets where its argmax is the main
  model's k steps later: its greedy draft's acceptance when the drafts before it were right, on
  held-out text rather than the model's own)."""
  out = {}
  for k, (nll, hits, n) in enumerate(zip(sums["nll"], sums["hits"], sums["targets"], strict=True)):
    loss, acc = ("ntp_loss", "ntp_acc") if k == 0 else (f"mtp_loss_{k}", f"mtp_acc_{k}")
    out[f"eval/{loss}"] = float(nll) / max(float(n), 1.0)
    out[f"eval/{acc}"] = float(hits) / max(float(n), 1.0)
  for k, agree in enumerate(sums["agree"], start=1):
    out[f"eval/mtp_agree_{k}"] = float(agree) / max(float(sums["targets"][k]), 1.0)
  return out


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, mesh, lr_schedule):
  accum = cfg.train.grad_accum_steps
  mtp_cfg, moe_cfg = cfg.model.mtp, cfg.model.moe
  inject_nan = sorted(set(cfg.train.inject_nan_at_steps))

  def train_step(state: TrainState, batch: Batch):
    with sharding.activate(mesh, cfg.mesh.rules):
      denominators = jnp.maximum(target_counts(batch, mtp_cfg.depth), 1)
      lam = losses.mtp_weight(state.step, mtp_cfg.loss_weight, mtp_cfg.loss_weight_schedule)
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

      # With train.trainable=mtp only the MTP modules are differentiated: the trunk below them
      # runs forward only, keeping no activations for a backward pass and computing no gradients.
      params, frozen = trained(cfg, state.params)

      if accum == 1:
        (loss, sums), grads = grad_fn(params, frozen, state.router_bias, graphdef, batch, denominators, cfg, lam, 1)
      else:
        mbs = microbatches(batch, accum)
        # Replicas over data sum their own microbatches (train.data_grad_sum=step), or the compiler
        # sums each microbatch's gradient over data as it is made (microbatch).
        replicas = mesh.shape["data"] if cfg.train.data_grad_sum == "step" else 1

        def summed(params, frozen, bias, mbs, denominators, lam):
          """Every microbatch's gradients and sums, added up (on one replica's rows in the shard_map).
          The gradients are added where they are made (`loss_fn`'s `acc`): no microbatch's
          gradient of a scanned stack is held beside the sum."""

          def loss_of(mb, acc=None):
            return loss_fn(params, frozen, bias, graphdef, mb, denominators, cfg, lam, accum * replicas, acc)

          def add(carry, mb):
            (loss, sums), acc = carry
            (mb_loss, mb_sums), acc = jax.value_and_grad(loss_of, argnums=1, has_aux=True)(mb, acc)
            return ((loss + mb_loss, jax.tree.map(jnp.add, sums, mb_sums)), acc), None

          shapes = jax.eval_shape(loss_of, jax.tree.map(lambda x: x[0], mbs))
          zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes, params))
          return jax.lax.scan(add, zeros, mbs)[0]

        args = (params, frozen, state.router_bias, mbs, denominators, lam)
        if replicas == 1:
          (loss, sums), grads = summed(*args)
        else:
          (loss, sums), grads = _per_replica(summed, mesh, cfg.mesh.rules)(*args)

      if inject_nan:  # a test hook for the guard below: NaN loss and gradients at the chosen steps
        poison = jnp.where(jnp.isin(state.step + 1, jnp.asarray(inject_nan)), jnp.nan, 1.0)
        loss, grads = loss * poison, jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)

      updates, opt_state = tx.update(grads, state.opt_state, params)
      params = nnx.merge_state(optax.apply_updates(params, updates), frozen)
      bias = state.router_bias
      if moe_cfg.bias_update_rate and sums["load"]:
        model: Transformer = nnx.merge(graphdef, params, bias, copy=True)  # state.router_bias stays as it was
        for names, moe in model.moe_layers():
          if cfg.train.trainable == "mtp" and not names[0].startswith("mtp_"):
            continue  # a frozen trunk's routing stays as it was
          # One row per layer the module's bias stacks; a module shared by MTP depths sums theirs.
          load = jnp.stack([sums["load"][n] for n in names]).reshape(-1, *moe.router.bias.shape).sum(0)
          moe.router.update_bias(load, moe_cfg.bias_update_rate)
        bias = nnx.state(model, RouterBias)

      metrics = _metrics(loss, sums, denominators, grads, mtp_cfg.depth, bias)
      metrics["param_norm"] = optax.tree.norm(params)
      # The non-finite guard: a NaN or inf loss or gradient, or an update that overflows the
      # parameters, leaves parameters, optimizer state and router bias exactly as they were.
      ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["param_norm"])
      keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
      skipped = (~ok).astype(jnp.int32)
      new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        router_bias=keep(bias, state.router_bias),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
      )
      metrics["learning_rate"] = lr_schedule(state.step - state.skipped_steps)  # optax counts applied updates
      metrics["mtp_lambda"] = lam
      metrics["update_skipped"] = skipped
      metrics["skipped_steps"] = new_state.skipped_steps
      metrics["bad_streak"] = new_state.bad_streak
      return new_state, metrics

  return train_step


def _per_replica(summed, mesh, rules):
  """`summed` in a shard_map over the `data` mesh axis (the other axes left to the compiler),
  on each replica's rows of the microbatches (`summed`'s fourth argument), its results summed
  over the replicas once. The parameters enter unsplit over `data` and are differentiated
  inside, so each replica's gradient stays its own until that one sum. The device-variance type
  check is off (`check_vma`), as in the layers' own shard_maps, whose kernels' outputs carry no
  such type; the step's values are tested against one device (tests/test_step_equivalence.py)."""

  def local(*args):
    with sharding.activate(jax.sharding.get_abstract_mesh(), rules):  # `data` is manual in here
      return jax.lax.psum(summed(*args), "data")

  whole, rows = PartitionSpec(), PartitionSpec(None, "data")
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(whole, whole, whole, rows, whole, whole),
    out_specs=whole,
    axis_names={"data"},
    check_vma=False,
  )


def _metrics(loss, sums, denominators, grads, depth: int, bias) -> dict[str, jax.Array]:
  per_depth = sums["nll"] / denominators
  acc = sums["hits"] / denominators
  m = {
    "loss": loss,
    "ntp_loss": per_depth[0],
    "ntp_acc": acc[0],
    "balance_loss": sums["balance_loss"],
    "z_loss": sums["z_loss"],
    "grad_norm": optax.tree.norm(grads),
  }
  for k in range(1, depth + 1):
    m[f"mtp_loss_{k}"] = per_depth[k]
    m[f"mtp_acc_{k}"] = acc[k]
  if sums["load"]:
    ratios = {k: v.max() / jnp.maximum(v.mean(), 1e-9) for k, v in sums["load"].items()}
    m["expert_load_max_over_mean"] = jnp.mean(jnp.stack(list(ratios.values())))
    for k, r in ratios.items():
      m[f"moe/{k}/load_max_over_mean"] = r
    total_slots = sum(v.sum() for v in sums["load"].values())
    m["dropped_fraction"] = sum(sums["dropped"].values()) / jnp.maximum(total_slots, 1)
    m["router_bias_abs_mean"] = jnp.mean(jnp.stack([jnp.abs(b).mean() for b in jax.tree.leaves(bias)]))
  return m
