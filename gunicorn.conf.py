"""What ``gunicorn wsgi:app`` reads in this folder: the backend's settings, kept in backend/web/gunicorn_conf.py."""

from backend.web.gunicorn_conf import *
