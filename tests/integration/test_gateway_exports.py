"""ExportLayer: a layer's export files served as their methods stored them."""

from __future__ import annotations

import grpc
import pytest

from services.common import result_store
from services.gateway.servicer import EXPORT_CHUNK_BYTES
from tests.integration.gateway_fakes import FakeWorld, fake_spec


def test_an_export_is_served_whole_and_a_missing_one_is_not_found(world: FakeWorld) -> None:
    world.start_gateway()
    with world.client() as client:
        job = client.wait(client.submit(fake_spec(layers=("conv1",))).id)
        # larger than one chunk, as a wide layer's tally.csv is
        tally = "unit,category,label,score\n" + "".join(
            f"{u + 1},object,dog,0.{u:06d}\n" for u in range(EXPORT_CHUNK_BYTES // 20)
        )
        result_store.write_export(world.store, job.id, "conv1", "tally", tally)
        assert client.export(job.id, "conv1", "tally") == tally
        with pytest.raises(grpc.RpcError) as caught:
            client.export(job.id, "conv1", "clip_dissect")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "clip_dissect did not run" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            client.export(job.id, "conv1", "gradcam")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
