"""Drift monitoring in the server: what the served model sees, tested against its reference, off the request path.

A request only appends its rows (the model's `embedding` and `probabilities` outputs, and a reference to the input
image: the uint8 tensor the model was fed) to the window of `tasks.drift.Stream`. Every `--drift-every` rows the test
runs in the monitor's own thread (one test at a time; ~2-5 ms for 100 x 1,280 embeddings, the image statistics of the
20 new images included), never on the event loop or a model thread: the new images' statistics (brightness,
contrast, sharpness: `tasks.drift.image_statistics`) are computed there, after which the window drops the image (it
keeps it with `--drift-save-dir`). The statistics (`tasks.drift`: KS per principal component, per class probability
and per image statistic, Bonferroni) are the ones `finetune drift FOLDER` and bench/bench_drift.py use. A model whose
reference predates the image statistics is monitored with the first two detectors.

When `--drift-consecutive` tests in a row reject, the alarm is raised (once per episode): `drift_detected` goes to
1, `drift_alarms_total` counts it, the window's images are saved when asked (`deploy.retrain.save_window`), and the
retraining deployment is started when one is named (`deploy.retrain.Retrainer`: an HTTP POST to the Prefect API,
no prefect import). A hot swap starts a new window against the new model's reference.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from deploy.retrain import Retrainer, save_window
from deploy.settings import DriftSettings
from tasks import drift

log = logging.getLogger("deploy.monitor")


class Monitor:
    """The drift stream of the served model, its test thread, and what an alarm does."""

    def __init__(self, settings: DriftSettings, metrics=None, retrainer: Retrainer | None = None):
        self.settings, self.metrics, self.retrainer = settings, metrics, retrainer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift")
        self._lock = threading.Lock()
        self.model = None
        self.stream: drift.Stream | None = None
        self.note: str | None = "drift monitoring is off (--no-drift)" if not settings.enabled else None
        self.last_saved: dict | None = None
        self._pending: list[Future] = []

    def attach(self, model) -> None:
        """Monitor `model` from now on (at start and after each hot swap): a fresh window against its reference."""
        with self._lock:
            self.model, self.stream = model, None
            if not self.settings.enabled:
                return
            if model.reference is None:
                self.note = f"not monitored: {model.reference_note}"
                log.warning("drift monitoring off for %s: %s", model.version, model.reference_note,
                            extra={"event": "drift", "version": model.version, "monitored": False})
            else:
                s = self.settings
                self.stream = drift.Stream(model.reference, s.window, s.every, s.alpha, s.consecutive,
                                           keep_images=s.save_dir is not None)
                self.note = None
        if self.metrics is not None:
            self.metrics.drift_reset()

    def monitors(self, model) -> bool:
        """Whether requests to `model` feed the window (the embedding output is then asked for)."""
        return self.stream is not None and model is self.model

    def observe(self, model, images: np.ndarray, probabilities: np.ndarray, embeddings: np.ndarray) -> None:
        """A request's rows (on the event loop: an append; the test, when due, goes to the monitor's thread)."""
        stream = self.stream
        if stream is None or model is not self.model:
            return  # a request that started before a swap: its outputs belong to the old model's space
        if stream.add(embeddings, probabilities, images):
            # one test running and at most one waiting: a burst of due tests while one runs becomes one more test
            self._pending = [f for f in self._pending if not f.done()]
            if len(self._pending) < 2:
                self._pending.append(self.executor.submit(self._test, model, stream))
        if self.metrics is not None and stream.tests == 0:  # filling up; then the test thread keeps it current
            self.metrics.drift_window.set(len(stream.window))

    def _test(self, model, stream: drift.Stream) -> None:
        try:
            outcome = stream.test()
        except Exception:  # never let monitoring hurt serving
            log.exception("drift test failed")
            return
        if stream is not self.stream:
            return  # the model was swapped meanwhile: this window's verdict is about a model no longer served
        if self.metrics is not None:
            self.metrics.drift_tested(outcome)
            self.metrics.drift_window.set(len(stream.window))
        if outcome.alarm:
            self._alarm(model, stream, outcome)

    def _alarm(self, model, stream: drift.Stream, outcome: drift.Outcome) -> None:
        p = outcome.result.pvalues
        log.warning("drift detected on %s: p-values embedding %.2e, softmax %.2e, image %.2e (alpha %g, %d tests "
                    "in a row)", model.version, p["embedding"], p["softmax"], p.get("image", float("nan")),
                    stream.alpha, stream.consecutive,
                    extra={"event": "drift", "version": model.version, "pvalues": p, "alarm": stream.alarms})
        saved = None
        if self.settings.save_dir is not None:
            try:
                saved = save_window(self.settings.save_dir, self.settings.save_max, outcome, model.classes,
                                    model.version)
            except OSError as exc:
                saved = {"saved": 0, "error": str(exc)}
                log.error("could not save the drifted window's images: %s", exc)
            self.last_saved = saved
        if self.retrainer is not None:
            trigger = {"kind": "drift", "model_version": model.version, "detected_at": stream.last_alarm["at"],
                       "pvalues": p, "alpha": stream.alpha, "window": stream.window.size, "every": stream.every,
                       "consecutive": stream.consecutive, "rows_seen": stream.seen,
                       "saved_images": (saved or {}).get("folder")}
            result = self.retrainer.request(trigger)
            if self.metrics is not None:
                self.metrics.drift_retrains.labels("ok" if result.get("ok") else result.get("status", "failed")).inc()

    def state(self) -> dict:
        """The drift block of /api/model."""
        stream = self.stream
        out = {"enabled": stream is not None, "note": self.note}
        if stream is not None:
            out.update(stream.state())
        if self.settings.save_dir is not None:
            out["save"] = {"folder": str(self.settings.save_dir), "max": self.settings.save_max,
                           "last": self.last_saved}
        if self.retrainer is not None:
            out["retrain"] = self.retrainer.state()
        return out

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the tests in flight, if any (tests and shutdown)."""
        for pending in list(self._pending):
            pending.result(timeout)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
