"""Prometheus metrics from the captioning workers, through `ray.util.metrics`.

Each captioning actor reports after every batch; Ray's metrics agent on each node exports the
series to Prometheus (and so to the Ray dashboard's Grafana panels), tagged with the node and actor:

    gitcap_images_total{status="ok"|"failed"}   images out of the captioner (rate(): images/s)
    gitcap_tokens_total                          caption tokens generated (rate(): tokens/s)
    gitcap_errors_total{reason="image_truncated", ...}   error rows by reason code
    gitcap_batch_seconds                         time to caption one batch (histogram)
    gitcap_batch_images                          images per captioned batch (histogram)

Outside a Ray worker (a unit test calling the captioner directly) the metrics are not recorded.
"""

from __future__ import annotations

from collections import Counter

BATCH_SECONDS_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_IMAGES_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class CaptionMetrics:
    """The series one captioning actor reports; `record_batch` after each batch."""

    def __init__(self, model_id: str) -> None:
        import ray
        from ray.util import metrics

        self.enabled = ray.is_initialized()
        if not self.enabled:
            return
        self.tags = {"model": model_id}
        self.images = metrics.Counter(
            "gitcap_images_total", "Images out of the captioner, by status", tag_keys=("model", "status")
        )
        self.tokens = metrics.Counter("gitcap_tokens_total", "Caption tokens generated", tag_keys=("model",))
        self.errors = metrics.Counter("gitcap_errors_total", "Error rows by reason code", tag_keys=("model", "reason"))
        self.batch_seconds = metrics.Histogram(
            "gitcap_batch_seconds", "Seconds to caption one batch", BATCH_SECONDS_BOUNDARIES, tag_keys=("model",)
        )
        self.batch_images = metrics.Histogram(
            "gitcap_batch_images", "Images per captioned batch", BATCH_IMAGES_BOUNDARIES, tag_keys=("model",)
        )

    def record_batch(self, captioned: int, tokens: int, seconds: float, errors: list[str | None]) -> None:
        """One batch: `captioned` images given captions in `seconds`, generating `tokens` tokens;
        `errors` holds every row's error (None when fine), from decoding or captioning."""
        if not self.enabled:
            return
        reasons = Counter(error.split(":", 1)[0] for error in errors if error is not None)
        ok = len(errors) - sum(reasons.values())
        if ok:
            self.images.inc(ok, tags={**self.tags, "status": "ok"})
        if reasons:
            self.images.inc(sum(reasons.values()), tags={**self.tags, "status": "failed"})
        for reason, count in reasons.items():
            self.errors.inc(count, tags={**self.tags, "reason": reason})
        if captioned:
            self.tokens.inc(tokens, tags=self.tags)
            self.batch_seconds.observe(seconds, tags=self.tags)
            self.batch_images.observe(captioned, tags=self.tags)
