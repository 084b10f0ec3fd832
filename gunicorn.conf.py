"""gunicorn settings for llm-edge-proxy: `gunicorn -c gunicorn.conf.py`.

Everything is configured through environment variables (see README.md); this file only maps
the validated Config onto gunicorn's settings. It runs in the master at start and again on
every HUP. Loading the settings first also exports PROMETHEUS_MULTIPROC_DIR before any
prometheus_client import.
"""

from edge import gunicorn_hooks as hooks

_settings = hooks.load()  # exits with one line naming the variable if a value is malformed
_config = _settings.config

bind = [_config.bind]
workers = _config.default_workers()
worker_class = "edge.worker.EdgeUvicornWorker"
wsgi_app = "edge.gunicorn_hooks:worker_app()"
proc_name = f"llm-edge-proxy.{_config.instance}"

timeout = 30  # heartbeat: uvicorn workers notify the master on their own loop
graceful_timeout = _config.graceful_timeout_s
keepalive = _config.keepalive_s
preload_app = False  # workers build the app after fork: sessions and shared memory are per process

loglevel = _config.log_level
accesslog = None  # one JSON access line per request comes from the app (edge.access)
logconfig_dict = hooks.logconfig()

on_starting = hooks.on_starting
child_exit = hooks.child_exit
on_exit = hooks.on_exit

# Signals (HUP, TTIN, TTOU, TERM) are the control interface; gunicorn's control socket would
# default to one path per user and so be shared by two instances on a host.
control_socket_disable = True
