#!/usr/bin/env python3
"""Log receivers for the tests, built from the published formats: Loki's push API
(POST /loki/api/v1/push, JSON) and OTLP logs over HTTP (POST /v1/logs, protobuf,
decoded with PyPI's opentelemetry-proto, the OpenTelemetry project's own bindings).
Each record received is appended to OUT as one JSON line.

usage: log_receiver.py PORT OUT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

PORT, OUT = int(sys.argv[1]), sys.argv[2]
out = open(OUT, "a", buffering=1)


def strings(attributes):
    return {kv.key: kv.value.string_value for kv in attributes}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.headers.get("Content-Type", "")
        records = []
        if self.path == "/loki/api/v1/push" and kind == "application/json":
            for stream in json.loads(body)["streams"]:
                for entry in stream["values"]:
                    records.append({"receiver": "loki", "labels": stream["stream"], "ts": entry[0],
                                    "line": entry[1], "metadata": entry[2] if len(entry) > 2 else {}})
            answer = (204, b"", "text/plain")
        elif self.path == "/v1/logs" and kind == "application/x-protobuf":
            request = ExportLogsServiceRequest()
            request.ParseFromString(body)
            for resource_logs in request.resource_logs:
                resource = strings(resource_logs.resource.attributes)
                for scope_logs in resource_logs.scope_logs:
                    for r in scope_logs.log_records:
                        records.append({"receiver": "otlp", "resource": resource, "scope": scope_logs.scope.name,
                                        "time": r.time_unix_nano, "severity": r.severity_number,
                                        "severity_text": r.severity_text, "body": r.body.string_value,
                                        "attributes": strings(r.attributes)})
            answer = (200, ExportLogsServiceResponse().SerializeToString(), "application/x-protobuf")
        else:
            answer = (400, b"unknown path or content type", "text/plain")
        # Kept before the answer: what the sender saw taken is in OUT.
        for record in records:
            out.write(json.dumps(record) + "\n")
        self.answer(*answer)

    def answer(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
