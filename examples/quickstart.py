"""The five-minute quickstart: a local MLflow registry, a demo model, a backend, a prediction.

``python -m examples.quickstart`` (what ``make run`` does):

1. registers the demo models in a SQLite MLflow registry under ``.demo/`` (once);
2. starts a backend (``ls-mlflow serve``) on 127.0.0.1:9090 (``PORT`` to change it);
3. configures it with the client: ``models:/brightness@champion`` (an alias) and the hooks of ``examples/hooks.py``;
4. predicts two images made with Pillow and prints Label Studio's answer;
5. with ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` (a Personal Access Token) and ``LS_PROJECT`` set,
   connects that project and has Label Studio retrieve its predictions;
6. keeps serving until Ctrl-C, so Label Studio can connect (``--once`` stops here instead).
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

from examples.hooks import IMAGE_CONFIG, brightness_pre, choices_post
from lsmlflow import Client, ClientError, connect_project

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    port = os.environ.get("PORT", "9090")
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{DEMO / 'mlflow.db'}",
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

    print(f"2. starting the backend: ls-mlflow serve --port {port}   (its log: {DEMO / 'backend.log'})")
    backend = subprocess.Popen([sys.executable, "-m", "lsmlflow", "serve", "--port", port, "--model-dir", str(DEMO / "model_dir")],
                               env=env, cwd=ROOT, stdout=open(DEMO / "backend.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
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

        print("3. configuring models:/brightness@champion with the demo hooks (lsmlflow.Client)")
        try:
            served = Client(url).configure("models:/brightness@champion", pre_hook=brightness_pre, post_hook=choices_post,
                                           progress=lambda message: print("  ", message))
        except ClientError as exc:
            print(f"   error: {exc.error}\n   fix: {exc.detail}")
            return 1

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

        project = os.environ.get("LS_PROJECT")
        if project and os.environ.get("LABEL_STUDIO_URL") and os.environ.get("LABEL_STUDIO_API_KEY"):
            print(f"5. connecting Label Studio project {project} and retrieving its predictions")
            connection = connect_project(int(project), served.url, label_studio_url=os.environ["LABEL_STUDIO_URL"],
                                         api_key=os.environ["LABEL_STUDIO_API_KEY"], model_version=served.model_version)
            print(f"   project {project}: {connection.predictions} prediction(s) of {served.model_version}")
        else:
            print("5. to connect a Label Studio project, set LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (a Personal Access")
            print(f"   Token) and LS_PROJECT, or run: ls-mlflow connect --url {url} --project <id>")

        if "--once" in sys.argv:
            return 0
        print(f"6. serving on {url} until Ctrl-C")
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
