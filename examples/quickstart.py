"""The five-minute quickstart: a local MLflow registry, a demo model, a backend, a prediction.

``python -m examples.quickstart`` (what ``make run`` does):

1. registers the demo models in a SQLite MLflow registry under ``.demo/`` (once);
2. starts the backend with gunicorn on 127.0.0.1:9090 (``PORT`` to change it);
3. configures it with ``models:/brightness@champion`` (an alias) and the hooks of ``examples/hooks.py``;
4. predicts two images made with Pillow and prints Label Studio's answer;
5. keeps serving until Ctrl-C, so Label Studio can connect (``--once`` stops here instead).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from PIL import Image

from examples.hooks import IMAGE_CONFIG, brightness_pre, choices_post, encode

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    port = os.environ.get("PORT", "9090")
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{DEMO / 'mlflow.db'}",
        "MODEL_DIR": str(DEMO / "model_dir"),
        "PORT": port,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # Task data may name local files only under folders allowed here; the demo's images live in one.
        "LOCAL_FILES_ROOTS": ",".join(filter(None, [os.environ.get("LOCAL_FILES_ROOTS"), str(DEMO / "images")])),
    }
    if not (DEMO / "registered").exists():
        print("1. registering the demo models in", env["MLFLOW_TRACKING_URI"])
        subprocess.run([sys.executable, "-m", "examples.models", env["MLFLOW_TRACKING_URI"], "--no-torch"], env=env, cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (DEMO / "registered").touch()
    else:
        print("1. demo models already registered in", env["MLFLOW_TRACKING_URI"])

    print(f"2. starting the backend: gunicorn wsgi:app on {url}")
    backend = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "wsgi:app"], env=env, cwd=ROOT,
                               stdout=open(DEMO / "backend.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the child's
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:  # not listening yet, or the worker still booting
                pass
            if backend.poll() is not None or time.monotonic() > deadline:
                print(f"   the backend did not start; see {DEMO / 'backend.log'}")
                return 1
            time.sleep(0.1)

        print("3. configuring models:/brightness@champion with the demo hooks")
        answer = requests.post(url + "/configure", timeout=60, json={
            "model_uri": "models:/brightness@champion", "pre_hook": encode(brightness_pre), "post_hook": encode(choices_post)})
        print("  ", answer.status_code, json.dumps({k: answer.json().get(k) for k in ("status", "model_version", "flavor", "device")}))
        answer.raise_for_status()

        images = []
        (DEMO / "images").mkdir(exist_ok=True)
        for name, grey in (("white", 235), ("black", 20)):
            path = DEMO / "images" / f"{name}.png"
            Image.new("RGB", (64, 48), (grey, grey, grey)).save(path)
            images.append(path)
        tasks = [{"id": i + 1, "data": {"image": str(path)}} for i, path in enumerate(images)]
        print("4. POST /predict with", [t["data"]["image"] for t in tasks])
        answer = requests.post(url + "/predict", json={"tasks": tasks, "label_config": IMAGE_CONFIG}, timeout=60)
        answer.raise_for_status()
        print(json.dumps(answer.json(), indent=2))

        if "--once" in sys.argv:
            return 0
        print(f"5. serving on {url}: in Label Studio, Settings > Model > Connect model, URL {url}  (Ctrl-C stops)")
        print("   For images uploaded to Label Studio, run with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal")
        print("   Access Token, from Account & Settings); for your own image folders, LOCAL_FILES_ROOTS.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        backend.wait()
        return backend.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        if backend.poll() is None:
            backend.terminate()
            try:
                backend.wait(30)
            except subprocess.TimeoutExpired:
                backend.kill()


if __name__ == "__main__":
    sys.exit(main())
