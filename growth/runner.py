"""Run a progressive-growth experiment into a run directory, resumably.

Layout of `runs/<name>/`:
    config.json                      the resolved ExperimentConfig
    <arm>/seed<S>/metrics.jsonl      one JSON line per evaluation, plus "growth" events
    <arm>/seed<S>/d<W>.safetensors   the checkpoint at the end of each width's stage
    <arm>/seed<S>/result.json        written last: the arm is finished for that seed
    summary.json, summary.md         the table built by growth.summary
    figures/*.png                    the plots built by growth.plots

Rerunning the same experiment into the same directory skips every (arm, seed) with a result.json and
restarts unfinished ones from their beginning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange

from growth.dynamics import grow_trainer
from growth.experiment import Arm, ExperimentConfig, ScheduleError, seed_config
from models.checkpoint import CheckpointMeta, load_checkpoint
from models.data import ByteDataset, load_corpus
from models.model import TinyTransformer
from models.train import Trainer

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def copy_drift(model: TinyTransformer, copies: int) -> float:
    """Relative spread of the copies made by the latest growth, measured on the token embedding.

    The embedding's columns are `copies` blocks that were equal right after growth. Returns
    RMS(block - mean block) / RMS(mean block): 0 while the copies are identical.
    """
    if copies <= 1:
        return 0.0
    blocks = rearrange(model.token_embedding.weight.detach(), "v (c d) -> c v d", c=copies)
    mean = blocks.mean(dim=0)
    spread = (blocks - mean).square().mean().sqrt()
    return float(spread / mean.square().mean().sqrt().clamp_min(1e-30))


class ExperimentRunner:
    """Train every (arm, seed) of an experiment; each arm's progress goes to its own directory."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, device: torch.device | str = "cpu", fast: bool = True) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.fast = fast
        corpus = load_corpus(config.data, seed_config(2).context_length)
        self.corpus = corpus
        self.dataset = ByteDataset(corpus, seed_config(2).context_length)
        self.init_model, self.init_meta = self._load_init()

    def _load_init(self) -> tuple[TinyTransformer | None, CheckpointMeta | None]:
        if self.config.init_checkpoint is None:
            return None, None
        model, meta = load_checkpoint(self.config.init_checkpoint, fast=self.fast)
        for arm in self.config.arms:
            if not arm.is_scratch and arm.sizes[0] != model.config.d_model:
                raise ScheduleError(
                    f"arm {arm.name} starts at width {arm.sizes[0]}, but the initial checkpoint has "
                    f"d_model={model.config.d_model}"
                )
        return model, meta

    def prepare(self) -> None:
        """Create the run directory, or check that an existing one contains the same experiment."""
        config_path = self.run_dir / "config.json"
        resolved = self.config.to_dict()
        if config_path.exists():
            stored = json.loads(config_path.read_text())
            if stored != json.loads(json.dumps(resolved)):
                raise ScheduleError(
                    f"{self.run_dir} contains a different experiment; choose another --name or delete the directory"
                )
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(resolved, indent=2) + "\n")

    def arm_dir(self, arm: Arm, seed: int) -> Path:
        return self.run_dir / arm.name / f"seed{seed}"

    def is_done(self, arm: Arm, seed: int) -> bool:
        return (self.arm_dir(arm, seed) / RESULT_FILE).is_file()

    def pending(self) -> list[tuple[Arm, int]]:
        """(arm, seed) pairs without a finished result, in the order they will run."""
        return [(arm, seed) for seed in self.config.seeds for arm in self.config.arms if not self.is_done(arm, seed)]

    def run(
        self,
        on_step: Callable[[str, int], None] | None = None,
        workers: int = 1,
        on_arm_done: Callable[[Arm, int], None] | None = None,
    ) -> list[dict]:
        """Run every unfinished (arm, seed) and return all results, finished earlier or now.

        With `workers > 1` the pairs run in that many processes of one torch thread each. Models this
        small keep one core busy with a single thread, while several intra-op threads mostly wait on
        each other, so separate processes scale better. `on_step` is then not called.
        """
        self.prepare()
        for arm, seed in self.pending():
            logger.info("queued %s seed %d", arm.name, seed)
        if workers <= 1:
            for arm, seed in self.pending():
                self.run_arm(arm, seed, on_step)
                if on_arm_done is not None:
                    on_arm_done(arm, seed)
        else:
            context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {
                    pool.submit(_run_arm_in_worker, self.config.to_dict(), str(self.run_dir), str(self.device), self.fast, arm.name, seed): (arm, seed)
                    for arm, seed in self.pending()
                }
                for future in as_completed(futures):
                    future.result()  # re-raise a worker's error here
                    if on_arm_done is not None:
                        on_arm_done(*futures[future])
        return [
            json.loads((self.arm_dir(arm, seed) / RESULT_FILE).read_text())
            for seed in self.config.seeds
            for arm in self.config.arms
        ]

    def new_trainer(self, arm: Arm, seed: int) -> Trainer:
        train_config = dataclasses.replace(self.config.train, steps=arm.total_steps, seed=seed)
        if self.init_model is not None and not arm.is_scratch:
            model = TinyTransformer(self.init_model.config, fast=self.fast)
            model.load_state_dict(self.init_model.state_dict())
            meta = dataclasses.replace(
                self.init_meta, growth_history=list(self.init_meta.growth_history), corpus=self.corpus.fingerprint()
            )
        else:
            torch.manual_seed(seed)  # weight initialisation
            model = TinyTransformer(seed_config(arm.sizes[0]), fast=self.fast)
            meta = CheckpointMeta(model.config, corpus=self.corpus.fingerprint())
        model.to(self.device)
        return Trainer(model, self.dataset, train_config, meta)

    def run_arm(self, arm: Arm, seed: int, on_step: Callable[[str, int], None] | None = None) -> dict:
        directory = self.arm_dir(arm, seed)
        if directory.exists():
            shutil.rmtree(directory)  # an unfinished earlier attempt
        directory.mkdir(parents=True)
        metrics_path = directory / "metrics.jsonl"
        logger.info("training %s seed %d", arm.name, seed)

        trainer = self.new_trainer(arm, seed)
        copies = 1  # copies of each unit made by the latest growth

        def write(record: dict) -> None:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        last_eval: dict = {}

        def on_record(record: dict) -> None:
            last_eval.update(record)
            write({"event": "eval", "arm": arm.name, "seed": seed, **record, "copy_drift": copy_drift(trainer.model, copies)})

        step_callback = None if on_step is None else (lambda trainer_, loss: on_step(arm.name, seed))
        started = time.perf_counter()
        stage_end = 0
        growths = []
        for index, (width, stage_steps) in enumerate(zip(arm.sizes, arm.steps)):
            if index > 0:
                copies = width // trainer.model.config.d_model
                record = grow_trainer(
                    trainer,
                    width,
                    mode=arm.mode,
                    noise=arm.noise,
                    seed=seed,
                    optimizer=arm.optimizer,
                    width_aware=arm.width_aware,
                    rewarmup_steps=arm.rewarmup_steps,
                )
                growths.append(record)
                write({"event": "growth", "arm": arm.name, "seed": seed, **record})
            stage_end += stage_steps
            trainer.run(until_step=stage_end, on_step=step_callback, on_record=on_record)
            trainer.save(directory / f"d{width}.safetensors")

        final = trainer.model
        result = {
            "arm": arm.name,
            "seed": seed,
            "sizes": arm.sizes,
            "steps": arm.steps,
            "final_val_loss": last_eval["val_loss"],  # the run always evaluates at its last step
            "tokens": trainer.meta.tokens,
            "flops": trainer.meta.flops,
            "parameters": final.num_parameters(),
            "wall_time_s": time.perf_counter() - started,
            "growths": growths,
        }
        (directory / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return result


def _run_arm_in_worker(config: dict, run_dir: str, device: str, fast: bool, arm_name: str, seed: int) -> None:
    torch.set_num_threads(1)
    runner = ExperimentRunner(ExperimentConfig.from_dict(config), run_dir, device=device, fast=fast)
    arm = next(arm for arm in runner.config.arms if arm.name == arm_name)
    runner.run_arm(arm, seed)
