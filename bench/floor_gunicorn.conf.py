"""gunicorn settings for the benchmark floor (bench/floor_app.py): `gunicorn -c THIS_FILE`.

Same server shape as edge's gunicorn.conf.py (UvicornWorker on uvloop + httptools, access log
off, keep-alive 5 s), none of its features. FLOOR_BIND and FLOOR_WORKERS set by bench/run.py.
"""

import os
from pathlib import Path

pythonpath = str(Path(__file__).resolve().parent)
bind = [os.environ.get("FLOOR_BIND", "127.0.0.1:8081")]
workers = int(os.environ.get("FLOOR_WORKERS", "2"))
worker_class = "floor_app.FloorWorker"
wsgi_app = "floor_app:app"
proc_name = "llm-edge-proxy-bench-floor"
timeout = 30
graceful_timeout = 10
keepalive = 5
preload_app = False
loglevel = "warning"
accesslog = None
control_socket_disable = True
