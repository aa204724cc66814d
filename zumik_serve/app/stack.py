"""The local stack behind ``zumik serve`` and the integration tests: Redis, Ray, the Serve app.

Start order (each step reported through ``progress``), stop order reversed:

    model (build the tiny one if missing) → redis-server (unless ZUMIK_REDIS_URL)
      → the KV redis-server, when the profile's KV tiers use Redis (unless ZUMIK_KV_REDIS_URL):
        maxmemory kv_tiers.redis_max_memory_bytes, volatile-lru, no AOF (store/local_redis.py)
      → secrets (an earlier version's moved out of Redis, the missing ones generated, 0600)
      → Ray (local head with num_cpus=8, or join RAY_ADDRESS) → Serve app → /healthz answers

Only what this object started is stopped: a joined Ray cluster or an external Redis is left alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from profiles import Profile
from zumik_serve.app.monitoring import MonitoringOptions, MonitoringUrls, monitoring_urls
from zumik_serve.app.priority import WORKER_NICENESS_ENV
from zumik_serve.app.ray_head import forget_ray_address, record_ray_address
from zumik_serve.app.secrets_setup import prepare_secrets
from zumik_serve.app.shutdown import DrainOutcome, drain_serve_app
from zumik_serve.home import ZumikHome
from zumik_serve.model.resolve import resolve_model_dir
from zumik_serve.secret_files import secrets_dir
from zumik_serve.store.client import check_access
from zumik_serve.store.local_redis import (
    KV_REDIS_URL_ENV,
    REDIS_URL_ENV,
    LocalRedis,
    embedded_kv_redis,
    embedded_redis,
    free_port,
)
from zumik_serve.store.redis_acl import redact_url
from zumik_serve.tenancy.tenant import check_dev_key

Progress = Callable[[str], None]

# Ray on a 2-core machine needs more logical CPUs than physical ones to place the gateway,
# the engine replica and Serve's own actors.
LOCAL_RAY_NUM_CPUS = 8


@dataclass
class StackConfig:
    profile: Profile
    home: ZumikHome
    more_profiles: tuple[Profile, ...] = ()  # served beside ``profile`` (x-zumik-profile chooses)
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    ray_address: str | None = None
    dev_key: str | None = None
    redis_port: int | None = None
    kv_redis_url: str | None = None  # an external KV Redis (gateway user's URL); None: start one
    # "haproxy": Ray Serve's HAProxy ingress straight to replica ports (several ms faster per
    # request here than Serve's Python proxy; replica ports then listen on all interfaces).
    # "serve": Serve's default proxy. Only applies to a Ray head this stack starts.
    ingress: str = "haproxy"
    # The Ray dashboard and the metrics export port of a head this stack starts (app/monitoring.py).
    monitoring: MonitoringOptions = field(default_factory=MonitoringOptions)

    @classmethod
    def from_env(cls, profile: Profile, **overrides: object) -> StackConfig:
        config = cls(
            profile=profile,
            home=ZumikHome.from_env(),
            redis_url=os.environ.get(REDIS_URL_ENV) or None,
            kv_redis_url=os.environ.get(KV_REDIS_URL_ENV) or None,
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            dev_key=os.environ.get("ZUMIK_DEV_KEY") or None,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


@dataclass
class LocalStack:
    config: StackConfig
    redis: LocalRedis | None = None
    redis_url: str = ""
    kv_redis: LocalRedis | None = None  # the KV Redis this stack started
    kv_redis_url: str | None = None  # the engines' KV Redis (gateway user's URL); None: no Redis tier
    started_ray: bool = False
    connected_ray: bool = False  # this stack called ray.init (a head of its own, or joined one)
    timings_s: dict[str, float] = field(default_factory=dict)
    monitoring: MonitoringUrls | None = None  # the dashboard and metrics URLs, once Ray runs

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self, progress: Progress = lambda _: None) -> LocalStack:
        try:
            self._start(progress)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, progress: Progress) -> None:
        config = self.config
        check_dev_key(config.dev_key)  # before anything starts (`zumik serve` and the app's build too)
        home = config.home.ensure()

        with self._step("model"):
            progress(f"preparing model {config.profile.model.source}")
            model_dir = resolve_model_dir(config.profile, home)
            more = _more_models(config.more_profiles, home, progress)

        with self._step("redis"):
            if config.redis_url:
                progress(f"using Redis at {redact_url(config.redis_url)}")
                check_access(config.redis_url)  # a refused user stops here, saying what to check
                self.redis_url = config.redis_url
            else:
                progress(f"starting redis-server (AOF in {home.redis_dir})")
                self.redis = embedded_redis(home, port=config.redis_port).start()
                self.redis_url = self.redis.url
            for profile in (config.profile, *config.more_profiles):
                self._ensure_kv_redis(profile, progress)

        with self._step("secrets"):
            folder = secrets_dir(home)
            prepared = prepare_secrets(folder, self.redis_url)
            if prepared.migration is not None:
                progress(f"moved the secrets an earlier version kept in Redis into {folder}")
            if prepared.created:
                progress(f"generated {', '.join(p.name for p in prepared.created)} in {folder} (0600)")

        with self._step("ray"):
            if not config.ray_address:
                # Read by Serve at import and by every Ray process this head starts.
                os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if config.ingress == "haproxy" else "0"
                # HAProxy's stats and metrics listeners default to fixed ports (8404, 9101): pick
                # free ones unless set, so that a second local stack (a benchmark beside
                # `zumik serve`) can start.
                for variable in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
                    os.environ.setdefault(variable, str(free_port()))
                # Every worker of this head (Serve's proxy and HAProxy included) at the profile's
                # niceness instead of Ray's 15 (app/priority.py).
                os.environ[WORKER_NICENESS_ENV] = str(config.profile.niceness)
            import ray

            if config.ray_address:
                progress(f"joining Ray cluster at {config.ray_address}")
                context = ray.init(
                    address=config.ray_address, logging_level=logging.WARNING, log_to_driver=False
                )
            else:
                monitoring = config.monitoring.resolved()  # a taken fixed port stops here, naming it
                progress(
                    f"starting a local Ray head ({LOCAL_RAY_NUM_CPUS} logical CPUs, "
                    f"{config.ingress} ingress, {monitoring.describe()})"
                )
                context = ray.init(
                    address="local",
                    num_cpus=LOCAL_RAY_NUM_CPUS,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    **monitoring.ray_init_kwargs(),
                )
                self.started_ray = True
            self.connected_ray = True
            self.monitoring = monitoring_urls(context)
            # For `zumik tenant delete`, which sweeps every node's KV tiers through it.
            record_ray_address(home, str(ray.get_runtime_context().gcs_address))

        # Ray routes the root logger through its JSON handler; keep per-request client logs out.
        logging.getLogger("httpx").setLevel(logging.WARNING)

        with self._step("deploy"):
            from ray import serve

            from zumik_serve.app.application import APP_NAME, build_serve_app

            logging.getLogger("ray.serve").setLevel(logging.WARNING)
            for index, profile in enumerate((config.profile, *config.more_profiles)):
                progress(
                    f"deploying profile {profile.name}{' (the default)' if index == 0 and more else ''}: "
                    f"{'gateway + ' if index == 0 else ''}{profile.engine.num_replicas} vLLM replica(s) "
                    "(loading takes a minute)"
                )
            serve.start(http_options={"host": config.host, "port": config.port})
            app = build_serve_app(
                config.profile,
                model_dir=model_dir,
                redis_url=self.redis_url,
                dev_key=config.dev_key,
                home=home,
                kv_redis_url=self.kv_redis_url,
                more=more,
            )
            serve.run(app, name=APP_NAME, route_prefix="/")

        with self._step("http"):
            progress(f"waiting for {self.url}/healthz")
            wait_for_http(f"{self.url}/healthz", timeout_s=120)

    def redeploy(
        self, profile: Profile, progress: Progress = lambda _: None, *, more: Sequence[Profile] = ()
    ) -> None:
        """Replace the running app by ``profile``'s, with ``more`` profiles beside it (same
        Redis, same Ray head, same URL)."""
        from ray import serve

        from zumik_serve.app.application import APP_NAME, build_serve_app

        progress(f"deploying profile(s) {', '.join(p.name for p in (profile, *more))}")
        model_dir = resolve_model_dir(profile, self.config.home)
        served_more = _more_models(tuple(more), self.config.home, progress)
        for served in (profile, *more):
            self._ensure_kv_redis(served, progress)
        app = build_serve_app(
            profile, model_dir=model_dir, redis_url=self.redis_url, dev_key=self.config.dev_key,
            home=self.config.home, kv_redis_url=self.kv_redis_url, more=served_more,
        )  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix="/")
        wait_for_http(f"{self.url}/healthz", timeout_s=120)

    def drain(self, timeout_s: float) -> DrainOutcome:
        """New requests get 503 from now on; waits up to ``timeout_s`` for those in flight."""
        from zumik_serve.app.application import APP_NAME

        return drain_serve_app(APP_NAME, timeout_s)

    def stop(self) -> None:
        """Stop what this stack started; safe to call twice."""
        try:
            import ray

            if self.connected_ray and ray.is_initialized():  # never a Ray this stack did not join
                from ray import serve

                forget_ray_address(self.config.home)

                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            if self.kv_redis is not None:
                self.kv_redis.stop()
                self.kv_redis = None
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def _ensure_kv_redis(self, profile: Profile, progress: Progress) -> None:
        """The KV Redis ``profile``'s tiers need: the configured one, else one started here."""
        tiers = profile.kv_tiers
        if self.kv_redis_url is not None or not (tiers.enabled and tiers.redis):
            return
        if self.config.kv_redis_url:
            progress(f"using the KV Redis at {redact_url(self.config.kv_redis_url)}")
            check_access(self.config.kv_redis_url)
            self.kv_redis_url = self.config.kv_redis_url
            return
        home = self.config.home
        progress(f"starting the KV redis-server (maxmemory {tiers.redis_max_memory_bytes} B, volatile-lru)")
        self.kv_redis = embedded_kv_redis(home, tiers.redis_max_memory_bytes).start()
        self.kv_redis_url = self.kv_redis.url

    class _Timer:
        def __init__(self, stack: LocalStack, name: str) -> None:
            self._stack, self._name = stack, name

        def __enter__(self) -> None:
            self._t0 = time.monotonic()

        def __exit__(self, *exc: object) -> None:
            self._stack.timings_s[self._name] = time.monotonic() - self._t0

    def _step(self, name: str) -> LocalStack._Timer:
        return LocalStack._Timer(self, name)


def _more_models(
    profiles: tuple[Profile, ...], home: ZumikHome, progress: Progress
) -> list[tuple[Profile, Path]]:
    """Each further profile with its model folder (prepared like the first's)."""
    served = []
    for profile in profiles:
        progress(f"preparing model {profile.model.source} (profile {profile.name})")
        served.append((profile, resolve_model_dir(profile, home)))
    return served


def wait_for_http(url: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
            time.sleep(0.2)
