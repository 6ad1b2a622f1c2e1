"""The served model's state: loaded in a background thread while the server already answers
(503 on /health until it is loaded and warmed up), or the reason it failed to load.
"""

import logging
import os
import signal
import time

from training import hardware

log = logging.getLogger("app")  # the app's logger: its lines read "app: ..." wherever they come from
EXIT_LOAD_FAILED = 1  # errors.RunFailed's code: the run cannot go on


class ModelState:
    def __init__(self, cfg, exit_on_failure=False, on_ready=None):
        self.cfg = cfg
        self.exit_on_failure = exit_on_failure  # a server process stops; an app inside a test keeps serving 503
        self.on_ready = on_ready  # called with the classifier before it serves (the metrics hook in)
        self.classifier = None  # set once loaded and warmed up
        self.explaining = None  # the explainer (serve/explaining.py), set before `classifier`; None when off
        self.error = None  # set if loading failed

    def load(self, load_classifier, load_explainer):
        """Runs in a background thread; assigning `classifier` is what makes /health say 200, so the
        explainer loads (and warms up) first: a server that says ready answers /explain too."""
        try:
            started = time.perf_counter()
            if self.cfg.max_concurrent_explains > 0:
                self.explaining = load_explainer(self.cfg.model_dir, self.cfg, self.cfg.device)
            classifier = load_classifier(self.cfg.model_dir, self.cfg, self.cfg.device)
            if self.on_ready is not None:
                self.on_ready(classifier)
            self.classifier = classifier
            copy = " (and its float32 copy for /explain)" if self.explaining is not None else ""
            log.info("model %s%s loaded and warmed up in %.1f s: ready", self.cfg.model_dir, copy,
                     time.perf_counter() - started)
            note = hardware.serving_note(classifier.dtype) if classifier.device_type == "cpu" else None
            if note:
                log.warning("%s", note)
        except Exception as err:  # a broken folder (truncated weights, say): one paragraph, no traceback
            self.error = str(err).rstrip(".") or type(err).__name__
            log.error("%s", self.failure_message())
            if self.exit_on_failure:
                stop_server()

    def failure_message(self):
        stops = f"; the server stops with exit code {EXIT_LOAD_FAILED}" if self.exit_on_failure else ""
        return (f"error: cannot load the model from {self.cfg.model_dir!r}: {self.error}. Check that the folder "
                f"holds the complete files save_pretrained wrote (a copy cut short leaves truncated weights){stops}.")

    def not_ready(self, loading="the model is still loading; retry in a few seconds."):
        """Why there is no answer yet: the 503 message."""
        return loading if self.error is None else f"the model failed to load: {self.error}"


def stop_server():
    """Shut uvicorn down as an orchestrator does, with SIGTERM: the app has no handle on the server
    under uvicorn's own CLI. uvicorn closes its port, answers what is open, then ends the lifespan."""
    os.kill(os.getpid(), signal.SIGTERM)
