"""The HTTP/1.1 reverse proxy: routing by Host and path, keep-alive both ways, streaming with
backpressure, WebSocket and other upgrades, forwarded headers, redirects to https and ACME HTTP-01.

Entry point: `HttpProxy(routes, settings, on_request=..., acme_http01=...).serve(sock, client, local, ...)`.
"""

# First: decides whether the modules below load compiled or from source (native.py).
from . import native  # noqa: I001
from ..config.schema import HttpSettings
from .log import HttpRequestLog
from .proxy import HttpProxy
from .routes import (
           HttpRoute,
           HttpRoutes,
           HttpUpstream,
           route_for_service,
           upstream_for_service,
           upstream_ssl_context,
)

__all__ = ["HttpProxy", "HttpRequestLog", "HttpRoute", "HttpRoutes", "HttpSettings", "HttpUpstream", "native",
           "route_for_service", "upstream_for_service", "upstream_ssl_context"]
