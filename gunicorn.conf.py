"""What ``gunicorn wsgi:app`` reads in this folder: the backend's settings, kept in backend/gunicorn_conf.py."""

from backend.gunicorn_conf import *
