"""`describe-model` through a real gateway: long (ViT) layer names are never cut."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from neurodissect.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc
from rich.console import Console

from services.cli import main as cli
from services.common.server import ServiceServer
from tests.integration.gateway_fakes import FakeWorld

LONG = [
    "encoder.layers.encoder_layer_11.self_attention.out_proj",
    "encoder.layers.encoder_layer_11.mlp.linear_2_with_a_long_suffix_to_be_sure",
]


class _VitExtractor(extractor_pb2_grpc.ExtractorServicer):
    def DescribeModel(self, request, context):  # noqa: N802
        return common_pb2.DescribeModelResponse(
            layers=[common_pb2.LayerInfo(name=name, shape=[768, 14, 14], module_type="Linear")
                    for name in LONG], input_size=224)


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[list[str]]:
    world = FakeWorld(tmp_path)

    def register(server: grpc.Server) -> list[str]:
        extractor_pb2_grpc.add_ExtractorServicer_to_server(_VitExtractor(), server)
        return [extractor_pb2.DESCRIPTOR.services_by_name["Extractor"].full_name]

    extractor = ServiceServer("extractor", world.settings.replace(
        port=world.ports["extractor"], metrics_port=0), register).start()
    world.start_gateway()
    try:
        yield ["--gateway-addr", world.settings.gateway_addr, "describe-model",
               "--source", "torchvision", "--name", "vit_b_16"]
    finally:
        world.close()
        extractor.stop(0)


def test_piped_output_has_whole_names_one_line_each(
    gateway: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(gateway) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name}\t768×14×14\tLinear" for name in LONG]


def test_a_narrow_terminal_wraps_names_instead_of_cutting_them(
    gateway: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, width=50, soft_wrap=True))
    assert cli.main(gateway) == cli.EXIT_OK
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "…" not in out
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert all(len(cell) < 50 for cell in cells)
    assert "".join(cells) == "".join(LONG)
