"""S3-compatible servers that cannot list multipart uploads: one clear warning at start, not a misleading error.

rclone serve s3 and s3rver reject or lack ListMultipartUploads; the start-up
sweep of abandoned uploads used to report "the upload of '/' was aborted on
the S3 side".
"""
from __future__ import annotations

import logging

from moto.s3.responses import S3Response

from tests.conftest import wait_for

NOT_IMPLEMENTED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
                   b'<Message>A header you provided implies functionality that is not implemented'
                   b'</Message><RequestId>1</RequestId></Error>')


def test_a_server_without_list_multipart_uploads_gets_one_warning_at_start(
        make_gateway, s3_backend_table, monkeypatch, caplog):
    # The moto server answers over HTTP as such a server does; botocore parses
    # the error and the backend's error table converts it.
    monkeypatch.setattr(S3Response, "list_multipart_uploads",
                        lambda self: (501, {"Content-Type": "application/xml"}, NOT_IMPLEMENTED))
    caplog.set_level(logging.INFO)
    running = make_gateway(backends={"s3": s3_backend_table})

    def from_s3() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.storage.s3"]

    wait_for(from_s3, "the sweep's log line")
    running.gateway.stop()
    records = from_s3()
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert "cannot be swept" in message and s3_backend_table["endpoint_url"] in message
    assert not [r for r in caplog.records if "aborted" in r.getMessage()]


def test_a_server_that_answers_no_such_upload_to_the_listing_logs_nothing_misleading(
        make_gateway, s3_backend_table, monkeypatch, caplog):
    # rclone serve s3 (1.75, measured) answers 404 NoSuchUpload when a bucket has no uploads.
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchUpload</Code>'
            b'<Message>NoSuchUpload</Message><RequestId>1</RequestId></Error>')
    swept = []

    def answer(self):
        swept.append(True)
        return 404, {"Content-Type": "application/xml"}, body

    monkeypatch.setattr(S3Response, "list_multipart_uploads", answer)
    caplog.set_level(logging.INFO)
    running = make_gateway(backends={"s3": s3_backend_table})
    wait_for(lambda: swept, "the sweep's listing")
    running.gateway.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
