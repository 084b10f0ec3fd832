"""gunicorn settings for llm-edge-proxy: `gunicorn -c gunicorn.conf.py`.

Everything is configured through environment variables (see README.md); this file only maps
the validated Config onto gunicorn's settings. It runs in the master at start and again on
every HUP. Loading the settings first also exports PROMETHEUS_MULTIPROC_DIR before any
prometheus_client import.
"""

from edge.server import master as hooks

_settings = hooks.load()  # exits with one line naming the variable if a value is malformed
_config = _settings.config

bind = [_config.bind]
workers = _config.default_workers()
# HTTP/1.1: uvicorn's httptools worker with our limits (edge/server/protocol.py). HTTP/2 (over TLS,
# ALPN h2 + http/1.1): gunicorn's own ASGI worker, the one that speaks h2 (see README).
worker_class = "edge.server.worker." + (
    "EdgeH2Worker" if _config.http2_enabled else "EdgeUvicornWorker"
)
if _config.tls:
    certfile = str(_config.tls_cert_file)
    keyfile = str(_config.tls_key_file)
if _config.http2_enabled:
    http_protocols = "h2,h1"
    # edge.server.h2 answers 414/431 at our limits; gunicorn's own (a stream reset, or for the
    # HPACK list the whole connection closed, with no HTTP answer) stay as a backstop at twice
    # them, the HPACK list at least at gunicorn's default (which its SETTINGS advertise anyway:
    # gunicorn 27.0.1 sends its http2_* values, then h2's defaults, so clients keep the latter).
    # For the same reason http2_max_concurrent_streams stays at its default of 100: a lower
    # value would be enforced but not advertised, and compliant clients would lose their
    # connection for exceeding it. The per-worker cap is edge.server.h2's 503.
    limit_request_line = 2 * _config.max_request_line
    limit_request_fields = 2 * _config.max_headers
    limit_request_field_size = 2 * _config.max_header_bytes
    http2_max_header_list_size = max(
        65536, 2 * (_config.max_request_line + _config.max_header_bytes + 32 * _config.max_headers)
    )
wsgi_app = "edge.server.worker:worker_app()"
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
