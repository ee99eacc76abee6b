"""S3-specific behaviour the contract suite cannot see: keys, multipart uploads, failures, check."""
from __future__ import annotations

import http.server
import secrets
import socket
import threading
import tracemalloc

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from gateway import cli
from gateway.config import ConfigError, load_config
from gateway.errors import BackendUnavailable, InvalidPath, NotFound, PermissionDenied, Unsupported
from gateway.storage.base import Backend
from gateway.storage.s3 import MiB, S3Backend, S3Config
from tests.conftest import write_config
from tests.s3_server import count_calls

PART = 5 * MiB


def fail_on(backend, operation: str, after: int = 0) -> None:
    """Make every call of `operation` after the first `after` fail as if the endpoint vanished."""
    seen = [0]

    def handler(**kwargs) -> None:
        seen[0] += 1
        if seen[0] > after:
            raise EndpointConnectionError(endpoint_url="http://injected-failure")

    for client in (backend.client, backend.transfer_client, backend.slow_client):
        client.meta.events.register(f"before-call.s3.{operation}", handler)


def uploads_in_progress(raw, backend) -> list[str]:
    page = raw.list_multipart_uploads(Bucket=backend.bucket, Prefix=backend.prefix)
    return [u["Key"] for u in page.get("Uploads", [])]


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(256)) * (size // 256) + b"\x01" * (size % 256)


def read_all(backend, path: str) -> bytes:
    with backend.open_read(path) as stream:
        return stream.read()


# -- keys and directories -----------------------------------------------------

def test_keys_are_the_prefix_plus_the_path(make_s3, raw):
    backend = make_s3()
    backend.make_dir("/d")
    with backend.open_write("/d/f.txt") as upload:
        upload.write(b"x")
    keys = sorted(o["Key"] for o in raw.list_objects_v2(Bucket=backend.bucket, Prefix=backend.prefix)["Contents"])
    assert keys == [backend.prefix + "d/", backend.prefix + "d/f.txt"]


def test_dot_dot_never_reaches_a_key(make_s3):
    backend = make_s3()
    for path in ("/a/../b", "/..", "relative", "/a//b", "/"):
        with pytest.raises(InvalidPath):
            backend.key(path)


def test_directories_implied_by_keys_are_listed_and_survive_removing_their_last_file(make_s3, raw):
    backend = make_s3()
    raw.put_object(Bucket=backend.bucket, Key=backend.prefix + "a/b/c.txt", Body=b"c")
    assert backend.stat("/a").is_dir and backend.stat("/a/b").is_dir
    assert [e.name for e in backend.list_dir("/a")] == ["b"]
    backend.remove_file("/a/b/c.txt")
    assert backend.stat("/a/b").is_dir
    assert list(backend.list_dir("/a/b")) == []


def test_listing_hides_keys_no_path_can_name(make_s3, raw):
    backend = make_s3()
    for key in ("w/../x", "w//y", "w/ok", "w/.gw-upload-123"):
        raw.put_object(Bucket=backend.bucket, Key=backend.prefix + key, Body=b"1")
    assert [e.name for e in backend.list_dir("/w")] == ["ok"]


def test_usage_counts_a_folder_once_whether_a_marker_or_the_keys_below_it_make_it(make_s3, raw):
    # Folders count toward quota_files: a scan must count what a list_dir walk shows.
    backend = make_s3()
    for key in ("a/b/c.txt", "m/", "m/x", "e/", "w/../x", "w//y", "w/.gw-upload-1"):
        raw.put_object(Bucket=backend.bucket, Key=backend.prefix + key, Body=b"1" if key[-1] != "/" else b"")
    usage = backend.usage("/")
    # Folders a, a/b, m, e, w; files c.txt and x; the rest no path can name, or an upload's temp object.
    assert (usage.used_bytes, usage.used_files) == (2, 7)
    walked = Backend.usage(backend, "/")
    assert (walked.used_bytes, walked.used_files) == (2, 7)
    assert backend.usage("/a").used_files == 2


def test_set_mtime_is_kept_in_object_metadata(make_s3, raw):
    backend = make_s3()
    with backend.open_write("/f") as upload:
        upload.write(b"x")
    backend.set_mtime("/f", 1234567890.25)
    head = raw.head_object(Bucket=backend.bucket, Key=backend.prefix + "f")
    assert float(head["Metadata"]["mtime"]) == 1234567890.25


@pytest.mark.parametrize("listing_mtime", ["metadata", "server"])
def test_listing_mtime_comes_from_metadata_or_from_the_listing_alone(make_s3, listing_mtime):
    backend = make_s3(listing_mtime=listing_mtime)
    backend.make_dir("/d")
    with backend.open_write("/d/f") as upload:
        upload.write(b"abc")
    backend.set_mtime("/d/f", 1234567890.0)
    heads = count_calls(backend, "HeadObject")
    (entry,) = list(backend.list_dir("/d"))
    assert entry.size == 3 and backend.stat("/d/f").mtime == 1234567890.0
    if listing_mtime == "metadata":
        assert entry.mtime == 1234567890.0 and heads[0] >= 1
    else:
        assert entry.mtime != 1234567890.0 and heads[0] == 1   # only the stat above


def test_list_dir_fetches_pages_only_as_the_caller_advances(make_s3, raw):
    backend = make_s3(list_page_size=10)
    for i in range(30):
        raw.put_object(Bucket=backend.bucket, Key=f"{backend.prefix}lazy/f{i:02d}", Body=b"")
    lists = count_calls(backend, "ListObjectsV2")
    entries = backend.list_dir("/lazy")
    first = next(entries)
    assert lists[0] == 1 and first.name == "f00"
    rest = list(entries)
    assert lists[0] == 3 and len(rest) == 29


# -- multipart uploads --------------------------------------------------------

def test_a_large_upload_goes_up_in_parts_and_appears_only_on_commit(make_s3, raw):
    backend = make_s3(part_size=PART, parts_in_flight=2)
    data = pattern(12 * MiB + 3)
    parts = count_calls(backend, "UploadPart")
    upload = backend.open_write("/big.bin")
    for start in range(0, len(data), 100_000):
        upload.write(data[start:start + 100_000])
    assert parts[0] == 2
    assert uploads_in_progress(raw, backend) == [backend.prefix + "big.bin"]
    with pytest.raises(NotFound):
        backend.stat("/big.bin")
    assert upload.commit().size == len(data)
    assert parts[0] == 3
    assert read_all(backend, "/big.bin") == data
    assert uploads_in_progress(raw, backend) == []


def test_a_small_file_goes_up_in_one_put(make_s3):
    backend = make_s3(part_size=PART)
    puts, creates = count_calls(backend, "PutObject"), count_calls(backend, "CreateMultipartUpload")
    with backend.open_write("/small") as upload:
        upload.write(b"x" * 1000)
    assert (puts[0], creates[0]) == (1, 0)


def test_an_aborted_upload_leaves_no_multipart_upload(make_s3, raw):
    backend = make_s3(part_size=PART, parts_in_flight=2)
    upload = backend.open_write("/big.bin")
    upload.write(pattern(11 * MiB))
    assert uploads_in_progress(raw, backend)
    upload.abort()
    assert uploads_in_progress(raw, backend) == []
    with pytest.raises(NotFound):
        backend.stat("/big.bin")


@pytest.mark.parametrize("operation,after", [("UploadPart", 1), ("CompleteMultipartUpload", 0)])
def test_a_failed_upload_is_aborted_and_keeps_the_old_version(make_s3, raw, operation, after):
    backend = make_s3(part_size=PART, parts_in_flight=2)
    with backend.open_write("/f") as upload:
        upload.write(b"old")
    fail_on(backend, operation, after=after)
    upload = backend.open_write("/f")
    with pytest.raises(BackendUnavailable):
        for _ in range(4):
            upload.write(pattern(4 * MiB))
        upload.commit()
    upload.abort()
    assert uploads_in_progress(raw, backend) == []
    assert read_all(backend, "/f") == b"old"


def test_a_retried_complete_that_already_succeeded_counts_as_success(make_s3, raw):
    backend = make_s3(part_size=PART)

    def lost_answer(**kwargs) -> None:
        # The first attempt completed the upload but its answer never arrived;
        # the retry finds the upload gone.
        raise _client_error("NoSuchUpload", 404)

    backend.slow_client.meta.events.register("after-call.s3.CompleteMultipartUpload", lost_answer)
    data = pattern(7 * MiB)
    with backend.open_write("/f") as upload:
        upload.write(data)
    assert read_all(backend, "/f") == data
    assert uploads_in_progress(raw, backend) == []


def test_requests_transfers_and_slow_server_side_operations_get_their_own_read_timeouts(make_s3):
    backend = make_s3(request_timeout=4.0, read_timeout=5.0, slow_read_timeout=120.0)
    assert backend.client.meta.config.read_timeout == 4.0
    assert backend.transfer_client.meta.config.read_timeout == 5.0
    assert backend.slow_client.meta.config.read_timeout == 120.0


def test_parts_in_flight_are_bounded(make_s3):
    backend = make_s3(part_size=PART, parts_in_flight=2)
    turn = threading.Condition()
    active, peak = [0], [0]

    def started(**kwargs) -> None:
        # Hold each part until another is in flight too, so a writer that could
        # run ahead of the bound would show it.
        with turn:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            turn.notify_all()
            turn.wait_for(lambda: active[0] >= 2, timeout=2)

    def finished(**kwargs) -> None:
        with turn:
            active[0] -= 1

    backend.transfer_client.meta.events.register("before-call.s3.UploadPart", started)
    backend.transfer_client.meta.events.register("after-call.s3.UploadPart", finished)
    with backend.open_write("/big.bin") as upload:
        for _ in range(8):
            upload.write(pattern(PART))
    assert peak[0] == 2


def test_upload_memory_stays_near_part_size_times_parts_in_flight(s3_server_process, tmp_path):
    # moto runs in a child process here, so the objects it stores are not counted.
    table = s3_server_process.backend_table(prefix=f"mem-{secrets.token_hex(4)}")
    del table["type"]
    backend = S3Backend(S3Config(**table, part_size=PART, parts_in_flight=2, spool_dir=tmp_path))
    chunk = pattern(256 * 1024)
    try:
        tracemalloc.start()
        try:
            with backend.open_write("/big.bin") as upload:
                for _ in range(40 * 4):  # 40 MiB
                    upload.write(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        backend.close()
        s3_server_process.empty(table["prefix"])
    # the part-sized buffer and 2 parts in flight (3 parts), plus less than one
    # part of HTTP overhead (measured: 18.2 MiB)
    assert peak < PART * 4


def test_resume_copies_the_existing_object_server_side(make_s3):
    backend = make_s3(part_size=PART)
    old = pattern(6 * MiB)
    with backend.open_write("/f") as upload:
        upload.write(old)
    copies, gets = count_calls(backend, "UploadPartCopy"), count_calls(backend, "GetObject")
    with backend.open_write("/f", offset=len(old), truncate=False) as upload:
        upload.write(b"appended")
    assert (copies[0], gets[0]) == (1, 0)
    assert read_all(backend, "/f") == old + b"appended"


def test_resume_of_a_small_object_downloads_it_and_puts_once(make_s3):
    backend = make_s3(part_size=PART)
    with backend.open_write("/f") as upload:
        upload.write(b"small")
    puts = count_calls(backend, "PutObject")
    with backend.open_write("/f", offset=5, truncate=False) as upload:
        upload.write(b" file")
    assert puts[0] == 1
    assert read_all(backend, "/f") == b"small file"


def test_rewriting_bytes_already_uploaded_raises_unsupported_and_forward_writes_still_work(make_s3, raw):
    backend = make_s3(part_size=PART, parts_in_flight=2)
    data = pattern(6 * MiB)
    upload = backend.open_write("/f")
    upload.write(data)
    with pytest.raises(Unsupported):
        upload.write_at(0, b"header")
    with pytest.raises(Unsupported):
        upload.read_at(0, 10)
    upload.write_at(len(data) + 10, b"tail")
    assert upload.read_at(len(data) - 2, 16) == data[-2:] + b"\0" * 10 + b"tail"
    upload.commit()
    assert read_all(backend, "/f") == data + b"\0" * 10 + b"tail"
    assert uploads_in_progress(raw, backend) == []


def test_spool_files_are_gone_after_commit_and_abort(make_s3, tmp_path):
    backend = make_s3()
    for finish in ("commit", "abort"):
        upload = backend.open_write("/f")
        upload.write_at(100, b"x")
        getattr(upload, finish)()
    assert list((tmp_path / "spool").iterdir()) == []


def test_reading_at_offsets_uses_one_get_until_the_reader_jumps(make_s3):
    backend = make_s3()
    data = pattern(3 * MiB)
    with backend.open_write("/f") as upload:
        upload.write(data)
    gets = count_calls(backend, "GetObject")
    with backend.open_read("/f") as stream:
        for offset in range(0, 2 * MiB, 32 * 1024):  # SFTP-style sequential reads at offsets
            stream.seek(offset)
            assert stream.read(32 * 1024) == data[offset:offset + 32 * 1024]
        assert gets[0] == 1
        stream.seek(100)
        assert stream.read(10) == data[100:110]
        assert gets[0] == 2


def test_large_objects_are_renamed_and_retimed_with_multipart_copy(make_s3, raw):
    backend = make_s3(part_size=PART, max_copy_size=PART)
    data = pattern(13 * MiB)
    with backend.open_write("/big") as upload:
        upload.write(data)
    copies = count_calls(backend, "UploadPartCopy")
    backend.set_mtime("/big", 1_500_000_000.0)
    backend.rename("/big", "/moved")
    assert copies[0] >= 4
    assert backend.stat("/moved").mtime == 1_500_000_000.0
    assert read_all(backend, "/moved") == data
    assert uploads_in_progress(raw, backend) == []


def test_sweep_aborts_abandoned_multipart_uploads(make_s3, raw):
    backend = make_s3(abandoned_upload_age=0.0)
    raw.create_multipart_upload(Bucket=backend.bucket, Key=backend.prefix + "orphan")
    assert backend.sweep_temp_files() == 1
    assert uploads_in_progress(raw, backend) == []


# -- errors and availability --------------------------------------------------

def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "HeadObject")


@pytest.mark.parametrize("code,status,expected", [
    ("NoSuchKey", 404, NotFound), ("404", 404, NotFound), ("AccessDenied", 403, PermissionDenied),
    ("InvalidAccessKeyId", 403, BackendUnavailable), ("SignatureDoesNotMatch", 403, BackendUnavailable),
    ("NoSuchBucket", 404, BackendUnavailable), ("SlowDown", 503, BackendUnavailable),
    ("KeyTooLongError", 400, InvalidPath), ("SomethingNew", 500, BackendUnavailable),
])
def test_botocore_error_codes_map_through_one_table(make_s3, code, status, expected):
    error = make_s3().convert_error(_client_error(code, status), "/p")
    assert type(error) is expected and "\n" not in str(error)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count_attempts(backend) -> list[int]:
    attempts = [0]

    def handler(**kwargs) -> None:
        attempts[0] += 1

    backend.client.meta.events.register("before-send.s3", handler)
    return attempts


def test_an_unreachable_endpoint_gives_backend_unavailable_after_bounded_retries(make_s3):
    backend = make_s3(endpoint_url=f"http://127.0.0.1:{_closed_port()}", max_attempts=2, connect_timeout=1.0)
    attempts = _count_attempts(backend)
    with pytest.raises(BackendUnavailable, match="cannot reach S3 endpoint"):
        backend.stat("/f")
    assert attempts[0] == 2


def test_an_endpoint_that_stops_answering_times_out_into_backend_unavailable(make_s3):
    # A listening socket nobody accepts from: the kernel completes the
    # handshake and the request then waits for an answer that never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        backend = make_s3(endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}", max_attempts=2,
                          request_timeout=0.5, connect_timeout=0.5, unanswered_pause=600)
        attempts = _count_attempts(backend)
        with pytest.raises(BackendUnavailable, match="stopped answering"):
            backend.open_read("/f")
        # A timeout is not retried: a server that froze would freeze the retry too.
        assert attempts[0] == 1
        # Until the pause is over, requests fail without waiting for the server.
        with pytest.raises(BackendUnavailable, match="is not answering"):
            backend.stat("/f")
        assert attempts[0] == 1
        backend.close()


def test_timeouts_and_retries_reach_the_client(make_s3):
    backend = make_s3(connect_timeout=2.5, request_timeout=3.0, read_timeout=7.0, max_attempts=4)
    config = backend.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 3.0)
    assert backend.transfer_client.meta.config.read_timeout == 7.0
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}


class _BadCredentials(http.server.BaseHTTPRequestHandler):
    def _deny(self) -> None:
        body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidAccessKeyId</Code>"
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _deny

    def log_message(self, *args) -> None:
        pass


def _check(tmp_path, capsys, table: dict) -> str:
    path = write_config(tmp_path, backends={"s3": table})
    assert cli.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "[backends.s3]" in err
    return err


def test_gateway_check_reports_a_missing_bucket_in_one_line(s3_server, tmp_path, capsys):
    err = _check(tmp_path, capsys, s3_server.backend_table() | {"bucket": "no-such-bucket"})
    assert "bucket 'no-such-bucket' does not exist" in err


def test_gateway_check_reports_an_unreachable_endpoint_in_one_line(s3_server, tmp_path, capsys):
    table = s3_server.backend_table() | {"endpoint_url": f"http://127.0.0.1:{_closed_port()}",
                                         "max_attempts": 1, "connect_timeout": 1.0}
    assert "cannot reach S3 endpoint" in _check(tmp_path, capsys, table)


def test_gateway_check_reports_bad_credentials_in_one_line(s3_server, tmp_path, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _BadCredentials)
    thread = threading.Thread(target=server.serve_forever, name="fake-s3")
    thread.start()
    try:
        table = s3_server.backend_table() | {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}"}
        assert "S3 rejected the credentials" in _check(tmp_path, capsys, table)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_gateway_check_passes_on_a_working_bucket(s3_server, tmp_path, capsys):
    path = write_config(tmp_path, backends={"s3": s3_server.backend_table()})
    assert cli.main(["check", "--config", str(path)]) == 0
    assert "s3 (s3)" in capsys.readouterr().out


@pytest.mark.parametrize("option,value", [("part_size", MiB), ("addressing_style", "sideways"),
                                          ("sse", "rot13"), ("prefix", "a/../b"),
                                          ("access_key_id", "only-half")])
def test_config_rejects_bad_values_naming_the_key(option, value):
    with pytest.raises(ConfigError, match=option):
        S3Config(bucket="bucket", **{option: value})


# -- through the gateway ------------------------------------------------------

def test_a_user_moves_files_between_a_local_home_and_an_s3_mount(make_gateway, s3_backend_table):
    running = make_gateway(backends={"s3": s3_backend_table})
    running.add_user("alice", home="local:/alice", mounts={"/archive": ("s3:/alice", ["*"])})
    fs = running.fs("alice")
    with fs.open_write("/report.txt") as upload:
        upload.write(b"quarterly numbers")
    fs.make_dir("/project")
    with fs.open_write("/project/notes.txt") as upload:
        upload.write(b"notes")
    fs.rename("/report.txt", "/archive/report.txt")
    fs.rename("/project", "/archive/project")
    assert not (running.data / "alice" / "report.txt").exists()
    assert sorted(e.name for e in fs.list_dir("/archive")) == ["project", "report.txt"]
    fs.rename("/archive/project", "/back")
    assert (running.data / "alice" / "back" / "notes.txt").read_bytes() == b"notes"
    with fs.open_read("/archive/report.txt") as stream:
        assert stream.read() == b"quarterly numbers"


def test_config_errors_name_the_file_the_backend_and_the_key(s3_server, tmp_path):
    path = write_config(tmp_path, backends={"s3": s3_server.backend_table() | {"part_size": 1024}})
    with pytest.raises(ConfigError, match=r"gateway.toml: \[backends.s3\] part_size: must be between"):
        load_config(path)


def test_the_spool_lives_in_the_state_dir_by_default(s3_server, tmp_path):
    config = load_config(write_config(tmp_path, backends={"s3": s3_server.backend_table()}))
    assert config.backends["s3"].options.spool_dir == config.server.state_dir / "s3-spool"
