"""The training loop: `run(config, workdir)` is the main job.

The config is resolved once into a RunSpec (hbpo_jax.spec; logged and written to
`<workdir>/spec.json`), then: policy (a Hugging Face folder, or the tiny task's warm start) ->
steps (hbpo_jax.train.step) with metrics, periodic evaluation and checkpoints -> export -> the
before/after evaluation. Re-running in the same workdir resumes from its newest checkpoint.

The workdir is a local path or gs://bucket/run: every file in it goes through hbpo_jax.files
(etils.epath) or Orbax, and nothing renames a folder (see hbpo_jax.files, hbpo_jax.checkpoint).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os

import jax
from flax import nnx

from hbpo_jax import checkpoint, files
from hbpo_jax import spec as spec_lib
from hbpo_jax import workdir as workdir_lib
from hbpo_jax.data import loader as prompts
from hbpo_jax.errors import ConfigError, WorkdirError
from hbpo_jax.eval import report
from hbpo_jax.eval import run as eval_run
from hbpo_jax.models import save_pretrained
from hbpo_jax.policy import Policy, pretrained, with_adapters
from hbpo_jax.rollout import static as sampler
from hbpo_jax.train import metrics as metrics_lib
from hbpo_jax.train import preemption
from hbpo_jax.train import update as trainer
from hbpo_jax.train.step import Step

log = logging.getLogger(__name__)

# fold_in offsets of the evaluations' keys (the steps use fold_in(key, step)).
_BEFORE, _AFTER, _PERIODIC = 10**6, 10**6 + 1, 2 * 10**6


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was kept."""


def build_policy(spec, workdir, mesh, rules) -> Policy:
    """The tiny task's warm start (task.name "arithmetic") or spec.model.path with spec.data,
    with LoRA adapters when spec.lora.rank > 0 (the base is read again like this on resume)."""
    if spec.task.name == "arithmetic":
        from hbpo_jax.tasks import warmstart
        policy = warmstart.arithmetic_policy(spec, workdir, mesh, rules)
    elif not spec.model.path:
        raise ConfigError("model_path is empty: name a Hugging Face model folder (or set task.name).")
    else:
        policy = pretrained(spec, mesh, rules)
    return with_adapters(policy, spec.lora, seed=spec.seed, mesh=mesh, rules=rules)


class _Evaluator:
    """The run's evaluations, all through eval.run.evaluate on spec.eval: the benchmarks are
    eval.benchmarks, else the task's eval set ("tiny")."""

    def __init__(self, spec, policy: Policy, mesh, rules):
        self.spec, self.policy, self.mesh, self.rules = spec.eval, policy, mesh, rules
        self.max_positions = sampler.graphdef_cfg(policy.graphdef, policy.params).max_position_embeddings
        self.benchmarks = eval_run.load_benchmarks(self.spec, policy.tokenizer,
                                                   tiny_records=policy.eval_records or None)

    def __call__(self, params, key) -> list[dict]:
        results = eval_run.evaluate(self.spec, self.policy.graphdef, params, self.policy.tokenizer,
                                    self.benchmarks, key, max_positions=self.max_positions,
                                    mesh=self.mesh, rules=self.rules)
        return [r.summary() for r in results]


def _cached_before(spec, evaluator: _Evaluator, params, key) -> list[dict]:
    """The before-training evaluation, cached beside a cached warm start and keyed by the
    evaluation settings: a rerun in the same workdir with other RL settings evaluates the warm
    start once."""
    cache_dir = evaluator.policy.cache_dir
    if not cache_dir:
        return evaluator(params, key)
    digest = hashlib.sha1(json.dumps(spec_lib.as_dict(spec.eval), sort_keys=True).encode()).hexdigest()[:16]
    path = files.join(cache_dir, f"eval-{digest}.json")
    if files.exists(path):
        log.info("before-training evaluation: cached in %s", path)
        return files.read_json(path)
    before = evaluator(params, key)
    if jax.process_index() == 0:
        files.write_json(path, before)
    return before


def run(config, workdir: str, allow_spec_change: tuple[str, ...] = ()) -> dict:
    """Trains as `config` says, in `workdir` (resuming from its checkpoints). Returns a summary.

    The workdir is locked for the run (hbpo_jax.workdir.Lock), and a resume that would change what
    its checkpoints mean is refused (hbpo_jax.workdir.check_resume) unless `allow_spec_change`
    names the changed keys (or prefixes; "*" = all). Both before anything is written."""
    _initialize_distributed(spec_lib.resolve_distributed(config))
    checkpoint.quiet_orbax_logs()
    spec = spec_lib.resolve(config)  # the config goes no further
    workdir = _absolute(workdir)
    lock = workdir_lib.Lock(workdir)
    _on_process_zero(lock.acquire)
    try:
        with _workdir_errors(workdir):
            return _run(spec, workdir, tuple(allow_spec_change))
    finally:
        lock.release()


def _on_process_zero(fn):
    """fn() on process 0 alone; a WorkdirError it raises is raised on every process (collective)."""
    error = result = None
    if jax.process_index() == 0:
        try:
            result = fn()
        except WorkdirError as e:
            error = e
    if preemption.any_process(error is not None):
        raise error or WorkdirError("process 0 refused the workdir (its message says why).")
    return result


@contextlib.contextmanager
def _workdir_errors(workdir: str):
    """A full disk or a read-only workdir, however deep (Orbax wraps tensorstore's errors), as one
    WorkdirError naming the workdir; everything else as it is."""
    try:
        yield
    except WorkdirError:
        raise
    except Exception as e:
        chain, seen = [], e
        while seen is not None and len(chain) < 20:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        for err in chain:
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise workdir_lib.os_error(err, workdir) from e
        if any(marker in str(err) for err in chain for marker in checkpoint.DISK_FULL):
            raise WorkdirError(f"no space left to write {workdir} ({workdir_lib.free_bytes(workdir)} bytes free); "
                               "free some space or choose another --workdir, then rerun to resume.") from e
        raise


def _record_spec(workdir: str, recorded: dict, history: list) -> None:
    log.info("run spec: %s", workdir_lib.write_spec(workdir, recorded, history))


def _run(spec, workdir: str, allow_spec_change: tuple[str, ...]) -> dict:
    writer_process = jax.process_index() == 0
    log.debug("run spec:\n%s", spec.to_json())
    # Checked before anything is written; recorded once the checkpoint restored (a checkpoint of
    # another model is refused too, and leaves spec.json as it was).
    recorded = spec_lib.as_dict(spec)
    history = _on_process_zero(lambda: workdir_lib.check_resume(workdir, recorded, allow_spec_change)[1])
    mesh, rules = spec.mesh.make(), spec.mesh.rules
    policy = build_policy(spec, workdir, mesh, rules)
    step_fn = Step(spec, policy, mesh, rules)
    base_key = jax.random.key(spec.seed)
    t = spec.train

    state = trainer.init_state(step_fn.trainable(policy.params), step_fn.optimizer)
    ckpt = checkpoint.TrainCheckpointer(files.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    # The same global batch on every process (see hbpo_jax.train.step).
    batches = prompts.prompt_batches(policy.train_records, batch_size=t.prompts_per_step, seed=spec.seed,
                                     shuffle=spec.data.shuffle, process_index=0, process_count=1)
    start = 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        start, state, meta = restored
        batches.set_state(meta["data"])
        log.info("resumed from step %d in %s", start, ckpt.directory)
    if writer_process:
        _record_spec(workdir, recorded, history)

    writer = metrics_lib.MetricsWriter(workdir, t.steps, start)
    summary: dict = {"workdir": workdir}
    evaluator = _Evaluator(spec, policy, mesh, rules) if (spec.eval.before_after or spec.eval.every) else None
    results_path = files.join(workdir, "results.json")
    if spec.eval.before_after:
        have_before = files.exists(results_path) and "before" in files.read_json(results_path)
        if not (have_before and (start > 0 or spec.eval.reuse_before)):
            before = _cached_before(spec, evaluator, policy.params, jax.random.fold_in(base_key, _BEFORE))
            if writer_process:
                files.write_json(results_path, {"before": before})
        if start == 0:  # a resumed run's metrics.jsonl has it already
            writer.scalars(0, eval_run.scalars(files.read_json(results_path)["before"], prefix="eval_before"),
                           console=False)

    step = start
    with preemption.StopSignal() as stop_signal:
        for step in range(start + 1, t.steps + 1):
            state, metrics = step_fn(state, next(batches), jax.random.fold_in(base_key, step))
            summary.update({k: float(metrics[k]) for k in ("reward", "accuracy") if k in metrics})
            if step % t.log_every == 0 or step == t.steps:
                writer.scalars(step, metrics)
            if spec.eval.every and step % spec.eval.every == 0:
                _periodic_eval(evaluator, step_fn.full(state.params), jax.random.fold_in(base_key, _PERIODIC + step),
                               step, writer, workdir)
            if int(state.skipped) > t.max_consecutive_skips:
                ckpt.save(step, state, _meta(batches, spec, step))
                ckpt.close()
                writer.close()
                raise TrainingError(
                    f"{int(state.skipped)} consecutive steps had a non-finite loss or gradient "
                    f"(train.max_consecutive_skips={t.max_consecutive_skips}); the last good state "
                    f"is checkpointed at step {step} in {ckpt.directory} (a rerun with other objective, loss "
                    "or rollout settings resumes from it with --allow_spec_change=<their keys>).")
            stop = stop_signal.should_stop(step)  # the same on every process (collective)
            if step % t.checkpoint_every == 0 or step == t.steps or stop:
                ckpt.save(step, state, _meta(batches, spec, step))
            if stop:
                ckpt.close()
                writer.close()
                summary.update(stopped_at=step, preempted=True, checkpoint=files.join(ckpt.directory, str(step)))
                return summary
    ckpt.close()
    summary["steps"] = step
    if ckpt.steps():
        summary["checkpoint"] = files.join(ckpt.directory, str(ckpt.steps()[-1]))

    if t.export_hf:
        export = files.join(workdir, "export")
        save_pretrained(nnx.merge(policy.graphdef, step_fn.full(state.params)), export, tokenizer=policy.tokenizer)
        summary["export"] = export
    if spec.eval.before_after:
        after = evaluator(step_fn.full(state.params), jax.random.fold_in(base_key, _AFTER))
        before = files.read_json(results_path)["before"]
        writer.scalars(step, eval_run.scalars(after, prefix="eval_after"), console=False)
        table = report.before_after_markdown(before, after)
        if writer_process:
            files.write_json(results_path, {"before": before, "after": after})
            summary["results"] = files.write_text(files.join(workdir, "results.md"), table + "\n")
        writer.text("eval/table", table, step)
        summary["table"] = table
    writer.close()
    if writer_process:
        summary["figure"] = _figure(workdir)
    return summary


def _figure(workdir: str) -> str | None:
    """<workdir>/training.png (hbpo_jax.train.figure); a figure that fails to draw is a warning."""
    from hbpo_jax.train import figure
    try:
        return figure.write(workdir)
    except Exception as e:  # the run's results are written; a plot is not worth failing it
        log.warning("could not draw %s/training.png: %s: %s", workdir, type(e).__name__, e)
        return None


def _periodic_eval(evaluator: _Evaluator, params, key, step: int, writer, workdir: str) -> None:
    """Scalars eval/<benchmark>/<mode>/... and <workdir>/eval/step_<step>.json."""
    summaries = evaluator(params, key)
    writer.scalars(step, eval_run.scalars(summaries), console=False)
    if jax.process_index() == 0:
        files.makedirs(files.join(workdir, "eval"))
        files.write_json(files.join(workdir, "eval", f"step_{step}.json"), {"step": step, "results": summaries})


def _initialize_distributed(d: spec_lib.DistributedSpec) -> None:
    """jax.distributed.initialize() when d.enabled: found automatically on TPU pods, or from the
    coordinator, process count and id (CPU clusters, tests)."""
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator:
        kwargs = dict(coordinator_address=d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
    if (jax.config.jax_platforms or "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _absolute(workdir) -> str:
    """A local workdir made absolute (Orbax wants one); gs://... as it is."""
    return os.path.abspath(workdir) if files.is_local(workdir) else os.fspath(workdir)


def _meta(batches, spec, step) -> dict:
    return {"data": batches.get_state(), "seed": int(spec.seed), "step": int(step),
            "rng": "jax.random.fold_in(key(seed), step)"}
