"""The training run behind `points finetune` (the command and its checks: points/tooling/finetune.py): the data
encoded and packed into steps, the model set up (LoRA or full, frozen parts), wrapped for several processes
(DDP, FSDP2), the optimizer loop with its log, checkpoints written whole and resumed, the result written.

    train(args, dist) -> 0       # args: finetune's parsed and checked options; dist: points.tooling.jobs.Dist
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from points.io.atomic import write_bytes_atomically, write_text_atomically
from points.io.checkpoint import DTYPES
from points.io.progress import Progress
from points.tooling.jobs import Dist, RunError, read_items
from points.tooling.options import progress_enabled

LATEST, LOG, DONE = "latest", "log.jsonl", "finetune.json"


# ----------------------------------------------------------------------------------------------- the plan

def _key(args, data_sha: str) -> dict:
    """What a resumed run must share with the one that wrote the checkpoint."""
    keep = ("lora_rank", "full", "lora_alpha", "lora_dropout", "lora_targets", "freeze", "epochs", "max_steps", "lr",
            "warmup", "weight_decay", "batch_tokens", "grad_accum", "seed", "dtype", "parallel")
    from points.tooling.options import quantize_record

    quantize = quantize_record(args) if getattr(args, "quantize", None) else {}  # (a run before the flags: {})
    return {"model": str(args.model.resolve()), "data_sha256": data_sha, **quantize,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in keep}}


def _epoch_rows(examples, epoch: int, seed: int, batch_tokens: int):
    from points.runtime.training import pack

    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return pack([examples[i] for i in order], batch_tokens)


def _steps(examples, args, world: int) -> list[list]:
    """Every optimizer step's rows (all processes'), in order: each epoch's shuffled, packed rows in groups of
    grad_accum * world."""
    group, steps = args.grad_accum * world, []
    for epoch in range(args.epochs):
        rows = _epoch_rows(examples, epoch, args.seed, args.batch_tokens)
        steps += [rows[i:i + group] for i in range(0, len(rows), group)]
    return steps[:args.max_steps] if args.max_steps else steps


# ----------------------------------------------------------------------------------------------- checkpoints

def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


_WHOLE = dict(full_state_dict=True, cpu_offload=True)


def _train_state(net, model, opt, sharded: bool) -> tuple[dict, dict]:
    """(the trainable weights under the model's names, float32 on the CPU; the optimizer's state), whole on
    process 0. Sharded (FSDP2), the shards are gathered: every process calls it."""
    trainable = _trainable(model)
    if not sharded:
        return {n: p.detach().float().contiguous().cpu() for n, p in trainable.items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(net, options=StateDictOptions(**_WHOLE, ignore_frozen_params=True))
    weights = {n.removeprefix("model."): t.float().contiguous() for n, t in weights.items()}
    return ({n: t for n, t in weights.items() if n in trainable},
            get_optimizer_state_dict(net, opt, options=StateDictOptions(**_WHOLE)))


def _set_train_state(net, model, opt, sharded: bool, weights: dict, optim: dict) -> None:
    if not sharded:
        with torch.no_grad():
            for n, p in _trainable(model).items():
                p.copy_(weights[n])
        opt.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, {"model." + n: t for n, t in weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(net, opt, optim, options=StateDictOptions(full_state_dict=True))


def _save_checkpoint(out: Path, step: int, net, model, opt, dist: Dist, sharded: bool) -> None:
    """OUT/checkpoint-STEP written whole under a temporary name, renamed, then OUT/latest names it; the older
    ones are removed after. Each process writes its own RNG state; sharded, the weights and the optimizer's
    state are gathered whole (a checkpoint reads the same whatever the sharding)."""
    from safetensors.torch import save

    weights, optim = _train_state(net, model, opt, sharded)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.partial"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-{dist.rank}.pt")
    if dist.rank == 0:
        write_bytes_atomically(tmp / "trainable.safetensors", save(weights))
        torch.save({"step": step, "optimizer": optim, "world": dist.world}, tmp / "state.pt")
    dist.barrier()
    if dist.rank == 0:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        write_text_atomically(out / LATEST, final.name + "\n")
        for old in out.glob("checkpoint-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_checkpoint(out: Path, net, model, opt, dist: Dist, sharded: bool) -> int:
    """The step the checkpoint OUT/latest names was written after (0 without one)."""
    from safetensors.torch import load_file

    latest = out / LATEST
    if not latest.is_file():
        return 0
    where = out / latest.read_text().strip()
    state = torch.load(where / "state.pt", weights_only=False)
    if state.get("world") != dist.world:
        raise RunError(f"{where}: written by {state.get('world')} process(es), resumed with {dist.world}; resume "
                       "with the same number (the RNG states are per process)")
    saved = load_file(str(where / "trainable.safetensors"))
    if set(saved) != set(_trainable(model)):
        raise RunError(f"{where}/trainable.safetensors: its tensors are not this run's trainable weights")
    _set_train_state(net, model, opt, sharded, saved, state["optimizer"])
    torch.set_rng_state(torch.load(where / f"rng-{dist.rank}.pt", weights_only=False)["torch"])
    return int(state["step"])


def _kept_log(out: Path, step: int) -> list[str]:
    """log.jsonl's lines of the steps up to `step` (a killed run may have logged steps past its checkpoint)."""
    path = out / LOG
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line
    return kept


# ----------------------------------------------------------------------------------------------- the run

def _setup_model(args, device):
    import points
    from points.runtime.lora import LoraConfig, add_lora

    load_dtype = torch.float32 if args.full else DTYPES[args.dtype]
    from points.tooling.options import quantize_options

    pipe = points.load(args.model, device=device, dtype=load_dtype, progress=False, prefix_cache=False,
                       **(quantize_options(args) if getattr(args, "quantize", None) else {}))
    model = pipe.model
    quantized = getattr(model.decoder, "quantization", None)
    if quantized and args.full:  # (LoRA trains on top of the codes: QLoRA)
        raise RunError(f"--model {args.model}: {quantized['scheme']}-quantized; full fine-tuning needs the float "
                       "checkpoint (LoRA trains on a quantized one)")
    model.train()
    if args.full:
        model.requires_grad_(True)
        for part in args.freeze:
            getattr(model, part).requires_grad_(False)
        for p in model.parameters():  # the master weights: float32, writable (not the file's memory map)
            if p.requires_grad:
                p.data = p.data.clone()
    else:
        add_lora(model, LoraConfig(rank=args.lora_rank or 8, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                   targets=args.lora_targets), seed=args.seed)
    if args.gradient_checkpointing:
        from points.runtime.training import checkpoint_blocks

        checkpoint_blocks(model)
    return pipe, model


def _encode_all(items, pipe, args, path: Path):
    from points.io.chat import ImageError
    from points.runtime.training import encode_example

    limit = min(args.batch_tokens, pipe.model.decoder.cfg.max_seq_len)
    examples = []
    for it in items:
        try:
            examples.append(encode_example(it.messages, pipe.tokenizer, pipe.processor, limit, it.id))
        except (ValueError, ImageError, OSError) as e:
            raise RunError(f"{path}, line {it.line} (id {it.id!r}): {e}") from None
    return examples


def _sum_hook(_, bucket):
    """DDP's communication hook: a bucket's gradients summed over the processes (DDP's own hook averages)."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _distribute(model, args, dist: Dist):
    """The module a step calls (`training.RowLoss` around the model) and whether its weights are sharded.
    One process: RowLoss itself. Under torchrun with DDP: wrapped, gradients summed by `_sum_hook` as the
    backward produces them, each gradient a view into its bucket (not a second copy); the trainable weights
    start equal on every process (the same checkpoint, the adapters from --seed), so DDP's first broadcast,
    which would also copy every frozen memory-mapped weight, is skipped. FSDP2: `fully_shard` on each decoder
    block, the embeddings and lm_head (each gathered only while it runs, in the forward and again in the
    backward; a tied pair, one Parameter, is one group of the two modules: its gradient, the lookup's plus the
    head's, is reduced whole), then on RowLoss for the rest (the final norm, the vision encoder and the
    projector: one group, gathered for the whole step, so that a process whose rows hold no image still joins
    every collective; its unused weights reduce zeros)."""
    from points.runtime.training import RowLoss

    net = RowLoss(model)
    if not dist.group:
        return net, False
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        decoder = model.decoder
        ends = ([[decoder.embed, decoder.lm_head]] if decoder.lm_head.weight is decoder.embed.weight
                else [decoder.embed, decoder.lm_head])  # tied: one Parameter, so one group for both modules
        units = [fully_shard(m) for m in (*decoder.layers, *ends)] + [fully_shard(net)]
        for unit in units:  # (a group's fully_shard gives its modules' list: the first stands for the group)
            unit = unit[0] if isinstance(unit, list) else unit
            unit.set_gradient_divide_factor(1.0)  # summed, as on one process
            unit.set_force_sum_reduction_for_comms(True)  # as ReduceOp.SUM (gloo has no PREMUL_SUM)
        net.set_reduce_scatter_unused_params(True)
        return net, True
    from torch.nn.parallel import DistributedDataParallel

    side = any(p.requires_grad for part in (model.vision, model.projector) for p in part.parameters())
    ddp = DistributedDataParallel(net, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                                  forward_sync_buffers=False, init_sync=False, gradient_as_bucket_view=True,
                                  find_unused_parameters=side)  # a text-only row leaves the vision side unused
    ddp.register_comm_hook(None, _sum_hook)
    return ddp, False


def _my_rows(rows: list, dist: Dist, grad_accum: int) -> list[tuple]:
    """This process's (row, weight) pairs of a step. Under torchrun every process takes exactly grad_accum
    forward and backward passes, so that their collectives pair up; a short last step pads with weight-0
    passes over one of its rows (their gradients are zeros)."""
    mine = [(row, 1.0) for row in rows[dist.rank * grad_accum:(dist.rank + 1) * grad_accum]]
    if dist.group:
        mine += [(rows[0], 0.0)] * (grad_accum - len(mine))
    return mine


def train(args, dist: Dist) -> int:
    from points.runtime.training import Schedule

    out: Path = args.output
    items = read_items(args.data, flag="--data")
    data_sha = hashlib.sha256(args.data.read_bytes()).hexdigest()
    key = _key(args, data_sha)
    done = out / DONE
    if done.is_file():
        recorded = json.loads(done.read_text())
        if recorded.get("key") != key:
            raise RunError(f"{out}: holds a finished run with other settings or data; pick another --output")
        print(f"points finetune: {out} is finished already ({recorded['steps']} steps)", file=sys.stderr)
        return 0
    if (out / "run.json").is_file():
        try:
            recorded = json.loads((out / "run.json").read_text())
        except ValueError:
            recorded = {}
        if recorded.get("key") != key:
            raise RunError(f"{out}: holds a run with other settings or data (run.json); the same command resumes "
                           "it, another --output starts afresh")
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"{out}: exists and is not a finetune run's directory; pick another --output")
    device = torch.device(dist.device)
    pipe, model = _setup_model(args, device)
    examples = _encode_all(items, pipe, args, args.data)
    steps = _steps(examples, args, dist.world)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / "run.json", json.dumps({"key": key}, indent=1) + "\n")
    net, sharded = _distribute(model, args, dist)
    params = list(_trainable(model).values())  # (sharded: the DTensor shards)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = Schedule(len(steps), args.warmup)
    torch.manual_seed(args.seed * 1000 + dist.rank)  # dropout's masks: the same on every run (resumed: restored)
    start = _load_checkpoint(out, net, model, opt, dist, sharded)
    if dist.rank == 0:  # said whether or not stderr is a terminal (the progress line is drawn only on one)
        what = "full" if args.full else f"LoRA rank {args.lora_rank or 8}"
        print(f"points finetune: {len(examples)} conversations, {len(steps)} steps ({what}, {dist.world} "
              f"process{'es' if dist.world > 1 else ''}) -> {out}" + (f"; resuming after step {start}" if start else ""),
              file=sys.stderr, flush=True)
    log_lines = _kept_log(out, start) if dist.rank == 0 else []
    if dist.rank == 0:
        write_text_atomically(out / LOG, "".join(line + "\n" for line in log_lines))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else nullcontext())
    bar = Progress("points finetune", len(steps), unit="steps", enabled=progress_enabled(args) and dist.rank == 0)
    bar.done = start
    log = open(out / LOG, "a") if dist.rank == 0 else None
    try:
        for step in range(start, len(steps)):
            rows = steps[step]
            total = sum(r.n_targets for r in rows)
            lr = args.lr * schedule(step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64)
            mine = _my_rows(rows, dist, args.grad_accum)
            for i, (row, weight) in enumerate(mine):
                # DDP sums the gradients once a step, after the last pass (FSDP2 reduces every pass's shards)
                quiet = hasattr(net, "no_sync") and i < len(mine) - 1
                with net.no_sync() if quiet else nullcontext():
                    with autocast:
                        loss = net(row)
                    (loss / total if weight else loss * 0.0).backward()
                loss_sum += weight * loss.detach().double().cpu()
            for p in params:  # weights no row reached this step: zeros, so AdamW treats them as on any step
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if dist.group:
                dist.all_reduce(loss_sum)  # for the log
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens = sum(r.n_tokens for r in rows)
            record = {"step": step + 1, "loss": float(loss_sum) / total, "tokens": tokens, "lr": lr}
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(tokens=tokens, note=f"loss {record['loss']:.4f}")
            if (step + 1) % args.save_every == 0 and step + 1 < len(steps):
                _save_checkpoint(out, step + 1, net, model, opt, dist, sharded)
    finally:
        if log is not None:
            log.close()
        bar.close()
    whole = _whole_weights(net) if sharded else None
    if dist.rank == 0:
        _finish(args, out, model, key, len(steps), whole)
        last = f", last loss {record['loss']:.4f}" if start < len(steps) else ""
        print(f"points finetune: {len(steps)} steps done -> {out} ("
              + ("a checkpoint in the model's layout" if args.full else "adapter.safetensors") + f"{last}; "
              f"log.jsonl)", file=sys.stderr, flush=True)
    dist.barrier()
    return 0


def _whole_weights(net) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model gathered whole on process 0 (every process calls it), by the model's
    names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {n for n, _ in net.model.named_parameters()}
    weights = get_model_state_dict(net, options=StateDictOptions(**_WHOLE))
    return {n.removeprefix("model."): t for n, t in weights.items() if n.removeprefix("model.") in names}


def _finish(args, out: Path, model, key: dict, n_steps: int, whole: dict | None) -> None:
    """The result (adapter or checkpoint; `whole`: a sharded model's weights gathered), then finetune.json
    marking the run finished, then the checkpoints are removed."""
    if args.full:
        from points.tooling.merge import write_model

        write_model(model, args.model, out, state=whole)
    else:
        from points.runtime.lora import base_identity, save_adapter

        model.eval()
        save_adapter(model, out, base=base_identity(model, (args.model / "config.json").read_bytes())
                     | {"path": str(args.model.resolve())})
    write_text_atomically(out / DONE, json.dumps({"key": key, "steps": n_steps, "finished": time.time()}) + "\n")
    for old in list(out.glob("checkpoint-*")) + list(out.glob(".checkpoint-*")):
        shutil.rmtree(old, ignore_errors=True)
    (out / LATEST).unlink(missing_ok=True)
