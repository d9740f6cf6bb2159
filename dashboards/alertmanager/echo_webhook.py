"""A stand-in webhook receiver for the docker-compose demo: prints each Alertmanager notification.

Replace it with your real receiver; Alertmanager posts JSON (version 4 webhook payload).
"""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            doc = json.loads(body)
            for alert in doc.get("alerts", []):
                labels = alert.get("labels", {})
                print(f"{alert.get('status')}: {labels.get('alertname')} run={labels.get('run', '-')} "
                      f"{alert.get('annotations', {}).get('summary', '')}", flush=True)
        except ValueError:
            print(f"not JSON: {body[:200]!r}", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
