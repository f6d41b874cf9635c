"""The settings of the online endpoint: every field once, with its default, help and check.

``segray serve`` builds its options from these fields, and Serve's ``app_builder`` takes a
``ServeConfig`` as its typed argument, so ``serve run segray.serve.app:app_builder
model_uri=… max_batch_size=16`` and a config file's ``args:`` are checked (and ``"16"`` becomes
16) the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from segray.errors import ConfigError
from segray.inference.onnx import RUNTIME_HELP, Runtime
from segray.inference.run import BATCH_SIZE
from segray.inference.tiling import BLEND, OVERLAP, Blend
from segray.inference.tta import HELP as TTA_HELP
from segray.inference.tta import TTA
from segray.io import storage
from segray.models.precision import Precision
from segray.serve.ingress import Ingress
from segray.settings import Settings, setting

if TYPE_CHECKING:
    from segray.models.card import ModelCard

ProxyLocation = Literal["EveryNode", "HeadOnly"]

#: Environment variable holding the bearer token that ``/v1/*`` requires (none: open).
TOKEN_ENV = "SEGRAY_API_TOKEN"


class ServeConfig(Settings, storage.Addressed):
    """Settings of one Serve application; the defaults serve on a laptop CPU."""

    model_uri: str = setting(help="Run folder, model folder or .keras file.", flag="--model")
    max_batch_size: int = setting(
        BATCH_SIZE, "Most requests a replica batches into one call.", ge=1
    )
    precision: Precision | None = setting(
        None, "Arithmetic of the model: fp32, bf16 or fp16 (default: the card's, as trained)."
    )
    runtime: Runtime = setting("keras", RUNTIME_HELP)
    bands: tuple[int, ...] | None = setting(
        None,
        "1-based bands of every input the model reads, e.g. 4,3,2 of a 7-band Landsat scene "
        "under an RGB model (default: the model card's; as many as the model's channels).",
    )
    batch_wait_timeout_s: float = setting(0.01, "Seconds a batch waits to fill.", ge=0)
    replicas: int = setting(1, "Replicas (the minimum when autoscaling).", ge=1)
    max_replicas: int | None = setting(None, "Autoscale from --replicas up to this many.", ge=1)
    target_ongoing_requests: float | None = setting(
        None,
        "Ongoing requests per replica that autoscaling aims at (default: max batch size).",
        gt=0,
    )
    upscale_delay_s: float = setting(30.0, "Seconds of load above target before adding.", ge=0)
    downscale_delay_s: float = setting(600.0, "Seconds below target before removing.", ge=0)
    proxy_location: ProxyLocation = setting(
        "EveryNode",
        "HTTP proxies on every node (behind a load balancer) or on the head node only.",
    )
    ingress: Ingress = setting(
        "auto",
        "haproxy: HAProxy forwards the port to the replicas' own HTTP servers (Serve's "
        "throughput mode; proxy where no HAProxy is installed; its stats and metrics pages "
        "listen on every interface); proxy: Serve's Python proxy; auto: proxy on a loopback "
        "--host, else haproxy. Set for a Ray that segray serve starts; a running cluster keeps "
        "its own.",
    )
    num_gpus: float = setting(0.0, "GPUs per replica.", ge=0)
    num_cpus: float = setting(1.0, "CPUs per replica.", ge=0)
    max_ongoing_requests: int | None = setting(
        None, "Requests a replica holds at once (default: max(32, 4 x max batch size)).", ge=1
    )
    max_body_bytes: int = setting(64 * 2**20, "Largest request body, in bytes.", ge=1)
    max_pixels: int = setting(
        4096 * 4096, "Largest image, in pixels; more: use the bulk path.", ge=1
    )
    max_windows: int = setting(
        256,
        "Most model windows one request may cause; larger images belong to the bulk path.",
        ge=1,
    )
    body_timeout_s: float = setting(30.0, "Seconds a client has to send the whole body.", gt=0)
    chunk_timeout_s: float = setting(10.0, "Seconds the body may stall between two chunks.", gt=0)
    overlap: int = setting(OVERLAP, "Overlap of windows of images larger than the model's.", ge=0)
    blend: Blend = setting(BLEND, "How overlapping windows are joined.")
    tta: TTA = setting("none", TTA_HELP + " Map tiles too.")
    allowed_sources: tuple[str, ...] = setting(
        (),
        "Prefixes (local folders, s3://bucket/prefix/) of the rasters the map tiles may read; "
        "none: the map routes read nothing.",
        flag="--allow-source",
    )
    tile_cache_bytes: int = setting(
        128 * 2**20, "Bytes of map tiles and native predictions a replica keeps.", ge=0
    )
    api_token: str | None = setting(None, f"Bearer token (default: ${TOKEN_ENV}).", cli=False)
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")
    host: str = setting("127.0.0.1", "Address to listen on (segray serve).")
    port: int = setting(8000, "Port to listen on (segray serve).", ge=1, le=65535)

    @model_validator(mode="after")
    def _scale(self) -> ServeConfig:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below replicas {self.replicas}")
        return self

    def check_card(self, card: ModelCard) -> None:
        """Refuse settings the model cannot take, before a replica starts: ``bands`` of another
        count than the model's channels."""
        if self.bands and len(self.bands) != card.channels:
            raise ConfigError(
                f"--bands {','.join(map(str, self.bands))}: the model reads {card.channels} "
                "band(s); give as many"
            )

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``SegmentModel.options``: resources, concurrency, scaling.

        ``max_ongoing_requests`` defaults to ``max(32, 4 * max_batch_size)``: Serve's own default
        of 5 would cap every batch at 5. Autoscaling targets ``max_batch_size`` ongoing requests
        per replica, so batches fill before Serve scales out.
        """
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or max(32, 4 * self.max_batch_size),
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or self.max_batch_size,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        else:
            options["num_replicas"] = self.replicas
        return options
