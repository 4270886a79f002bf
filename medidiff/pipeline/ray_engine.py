"""Ray execution of the batch.

A pool of actors, each holding its own models, runs the same per-scan function.

``--address`` joins an existing cluster (``ray start --head`` on Slurm / Kubernetes); without it a local
Ray starts with this machine's CPUs. One GPU per actor when the cluster has GPUs, else one CPU per actor.
Actors write a scan's outputs under OUT (a filesystem every node sees); only the driver writes the
manifest and talks to MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medidiff.pipeline.decoding import IsolatedDecoder
from medidiff.pipeline.model_cache import ModelCache
from medidiff.pipeline.settings import EnhanceSettings, ScanJob
from medidiff.pipeline.worker import failed_entry, process_scan


class _ScanActor:
    """One Ray actor: its own model cache and decoder child process; processes one scan per call."""

    def __init__(
        self, input_root: str, output_root: str, settings: EnhanceSettings, threads: int, device: str = "auto"
    ) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.input_root, self.output_root, self.settings = Path(input_root), Path(output_root), settings
        self.models = ModelCache(settings.models, device=device)
        self.decoder = IsolatedDecoder(settings.decode_timeout_s)

    def process(self, job: ScanJob) -> dict[str, Any]:
        return process_scan(job, self.input_root, self.output_root, self.settings, self.models, self.decoder)

    def identity(self) -> dict[str, dict[str, str]]:
        return self.models.identities()

    def node(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"


class RayEngine:
    """Runs scans on a Ray actor pool; yields results to the driver as they complete."""

    name = "ray"

    def __init__(
        self,
        input_root: Path,
        output_root: Path,
        settings: EnhanceSettings,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        num_cpus: int | None = None,
        threads: int | None = None,
        device: str = "auto",
    ) -> None:
        import ray

        self.input_root, self.output_root, self.settings = Path(input_root), Path(output_root), settings
        self._started_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        if device == "cuda" and not gpus:  # actors would ask for CUDA on nodes that have none
            if self._started_ray:
                ray.shutdown()
            raise ValueError("--device cuda, but the Ray cluster reports no GPU; use --device auto or cpu, "
                             "or start Ray on nodes with GPUs")
        cpus = max(1, int(resources.get("CPU", 1)))
        if gpus:
            count, options, threads = num_workers or gpus, {"num_gpus": 1, "num_cpus": 1}, threads or 4
        else:
            count = num_workers or cpus
            per_actor = max(1, cpus // count)
            options, threads = {"num_cpus": per_actor}, threads or per_actor
        self._actor_cls = ray.remote(_ScanActor).options(**options)
        self._args = (str(self.input_root), str(self.output_root), settings, threads, device)
        self.actors = [self._actor_cls.remote(*self._args) for _ in range(count)]
        per = "1 GPU" if gpus else f"{options['num_cpus']} CPU"
        self.description = f"ray: {count} actor(s), {per} and {threads} torch thread(s) each"

    def run(
        self,
        jobs: Iterator[ScanJob],
        on_start: Callable[[ScanJob], None],
        on_step: Callable[[ScanJob, int, int], None],
    ) -> Iterator[tuple[ScanJob, dict[str, Any]]]:
        """Keep every actor busy; yield (job, manifest entry) in completion order."""
        import ray

        jobs = iter(jobs)
        exhausted = False
        idle = list(self.actors)
        in_flight: dict[Any, tuple[ScanJob, Any]] = {}
        while True:
            while idle and not exhausted:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                actor = idle.pop()
                on_start(job)
                in_flight[actor.process.remote(job)] = (job, actor)
            if not in_flight:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            job, actor = in_flight.pop(ref)
            try:
                entry = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - an actor died (e.g. out of memory): fail the scan, replace it
                entry = failed_entry(job, f"worker failed: {type(exc).__name__}")
                ray.kill(actor, no_restart=True)
                self.actors.remove(actor)
                actor = self._actor_cls.remote(*self._args)
                self.actors.append(actor)
            idle.append(actor)
            yield job, entry

    def model_identity(self) -> dict[str, dict[str, str]]:
        import ray

        merged: dict[str, dict[str, str]] = {}
        for ident in ray.get([a.identity.remote() for a in self.actors]):
            merged.update(ident)
        return merged

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
