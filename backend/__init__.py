"""Serve an MLflow model to Label Studio as an ML backend; ``backend.app.create_app`` builds one."""
