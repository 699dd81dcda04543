"""The backend's entry point for gunicorn: ``gunicorn wsgi:app``."""

from backend.app import create_app

app = create_app()
