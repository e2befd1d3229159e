"""The `neurodissect` command line.

```
neurodissect [global flags] COMMAND ...
  up                      start the four services (and a local Ray head) until Ctrl-C
  serve SERVICE           run one service: gateway | extractor | explainer | captioner
  submit [SPEC] [flags]   submit a dissection (spec file in JSON mapping or YAML, and/or flags)
  watch JOB               live progress until the job ends
  status JOB              the job's state, stages, error and layer summaries
  jobs                    list jobs
  cancel JOB              cancel a queued or running job
  describe-model          a model's layers and output shapes
  results JOB             every method's answer per unit (table | json | csv)
  export JOB              tally.csv (NetDissect-Lite), CLIP-Dissect or MILAN CSV
  report JOB              the web UI's pages of a job as a static folder (--open: in a browser)
  show JOB                one unit's activation mask on a probe image, as PNG
  toyworld generate       write the toy world dataset
  demo                    start the stack, dissect toynet on the toy world, print results, stop
```

Global flags override NEURODISSECT_* environment variables, which override the
packaged defaults. Exit codes: 0 success; 1 the job ended FAILED or CANCELLED;
2 the request was rejected (the message names the status code and the field);
3 the local stack did not start or stay up (the message points at the service's log).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import signal
import sys
import threading
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.cli.demo_figures import figures_block, write_into
from services.cli.display import (
    JobProgress,
    console,
    errors,
    jobs_table,
    layers_table,
    print_footprint,
    print_stack,
    print_summary,
    results_table,
    stages_table,
)
from services.cli.stack import LocalStack, StackError, available_services
from services.common.errors import InvalidArgument, NeurodissectError
from services.common.settings import SERVICES, Settings
from services.common.spec_vocabulary import EXPORT_FORMATS
from services.gateway import results
from services.gateway.client import NeurodissectClient, load_spec
from services.gateway.jobs import TERMINAL, state_name
from services.gateway.peers import Peers
from services.gateway.validation import METHODS
from services.gateway.webui.commands import copy_report, unit_overlay

EXIT_OK, EXIT_JOB_FAILED, EXIT_REJECTED, EXIT_STACK_FAILED = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace, Settings], int]

# -- settings ------------------------------------------------------------------------------

def settings_from(args: argparse.Namespace) -> Settings:
    """Settings: defaults ← NEURODISSECT_* environment ← global flags."""
    return Settings.load(
        store_url=args.store_url,
        gateway_addr=args.gateway_addr,
        extractor_addr=args.extractor_addr,
        explainer_addr=args.explainer_addr,
        captioner_addr=args.captioner_addr,
        auth_token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        rpc_timeout_s=args.timeout,
        cache_dir=args.cache_dir,
        log_level=args.log_level,
    )


def follow(client: NeurodissectClient, job_id: str) -> common_pb2.Job:
    """Show live progress of a job until it is terminal; return it."""
    job = client.get(job_id)
    with JobProgress() as display:
        for job in client.watch(job_id):
            display.update(job)
    return job


def job_outcome(job: common_pb2.Job) -> int:
    """Print how the job ended and return the exit code."""
    if job.state == common_pb2.SUCCEEDED:
        return EXIT_OK
    if job.state in TERMINAL:
        errors.print(f"job {job.id} {state_name(job.state)}: {job.error}", markup=False)
        return EXIT_JOB_FAILED
    return EXIT_OK


# -- commands: services --------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run one service in the foreground until SIGTERM or Ctrl-C."""
    module = importlib.import_module(f"services.{args.service}.server")
    module.build(settings).start().wait()
    return EXIT_OK


def start_stack(
    args: argparse.Namespace,
    settings: Settings,
    on_restart: Callable[[str, str], None] | None = None,
) -> LocalStack:
    """Start the services that are installed, supervised, on the settings' ports or free ones.

    `on_restart(name, message)` is called after the supervisor restarted a process.
    """
    services = available_services()
    missing = [name for name in SERVICES if name not in services]
    if missing:
        errors.print(f"not installed, not started: {', '.join(missing)}")
    console.print("starting " + ", ".join(services) + (" and a Ray head" if args.ray_head else ""))
    return LocalStack(
        settings,
        services=services,
        ray_head=args.ray_head,
        free_ports=args.free_ports,
        log_dir=args.log_dir,
        on_restart=on_restart,
        extractors=args.extractors,
    ).start()


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Keep the local stack up, restarting what crashes, until Ctrl-C or SIGTERM.

    With --verbose, prints the memory each of its processes holds once started.
    Exits EXIT_STACK_FAILED when a process cannot be kept up (a crash loop).
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stacks: list[LocalStack] = []

    def on_restart(name: str, message: str) -> None:
        console.print(f"supervisor: {message}", markup=False)
        print_stack(stacks[0])

    stack = start_stack(args, settings, on_restart)
    stacks.append(stack)
    try:
        print_stack(stack)
        if args.verbose:
            print_footprint(stack.footprint())
        console.print(f"export NEURODISSECT_GATEWAY_ADDR={stack.address('gateway')}")
        console.print("up; Ctrl-C stops everything")
        while not stop.wait(0.5) and not stack.failed.is_set():
            pass
    finally:
        console.print("stopping")
        stack.stop()
    if stack.failed.is_set():
        errors.print(f"error: the local stack did not stay up: {stack.failure}", markup=False)
        return EXIT_STACK_FAILED
    return EXIT_OK


# -- commands: jobs ------------------------------------------------------------------------

def spec_from_args(args: argparse.Namespace) -> common_pb2.DissectionSpec:
    """The spec file (if any) with the flags for common fields applied on top."""
    spec = load_spec(args.spec) if args.spec else common_pb2.DissectionSpec()
    for value, path in (
        (args.model_source, "model.source"),
        (args.model, "model.name"),
        (args.weights, "model.weights_uri"),
        (args.preprocessing, "model.preprocessing"),
        (args.dataset_kind, "dataset.kind"),
        (args.dataset_uri, "dataset.uri"),
        (args.limit, "dataset.limit"),
        (args.batch_size, "compute.batch_size"),
        (args.unit_block_size, "compute.unit_block_size"),
        (args.device, "compute.device"),
        (args.idempotency_key, "idempotency_key"),
        (args.name, "name"),
    ):
        if value is not None:
            _set_flag(spec, path, value)
    if args.layers is not None:
        del spec.layers[:]
        spec.layers.extend(name.strip() for name in args.layers.split(",") if name.strip())
    for method in _methods(args.methods):
        getattr(spec, method).SetInParent()
    clip = common_pb2.ClipModelSpec(arch=args.clip_arch or "", weights_uri=args.clip_weights or "")
    if clip.arch:
        if spec.HasField("clip_dissect"):
            spec.clip_dissect.clip.CopyFrom(clip)
        if spec.HasField("simulation"):
            spec.simulation.simulator.CopyFrom(clip)
    if args.concept_set is not None:
        spec.clip_dissect.concept_set_uri = args.concept_set
    if args.milan_checkpoint is not None:
        spec.milan.checkpoint_uri = args.milan_checkpoint
    return spec


def _set_flag(spec: common_pb2.DissectionSpec, path: str, value: object) -> None:
    """Set the spec field at `path`; InvalidArgument naming it for a value out of its range."""
    *parents, leaf = path.split(".")
    target: Any = spec
    for part in parents:
        target = getattr(target, part)
    try:
        setattr(target, leaf, value)
    except ValueError as exc:
        raise InvalidArgument(f"{value} cannot be stored here: {exc}", field=path) from None


def _methods(flag: str | None) -> list[str]:
    if not flag:
        return []
    names = [m.strip() for m in flag.split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise InvalidArgument(
                f"unknown method {name!r}; use any of {', '.join(METHODS)}", field="methods"
            )
    return names


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """Submit a dissection; with --wait, follow it and print where the results are."""
    spec = spec_from_args(args)
    with NeurodissectClient(settings) as client:
        job = client.submit(spec)
        console.print(f"job: {job.id}", markup=False)
        if job.attempt > 1:
            console.print(f"attempt {job.attempt}: the job FAILED before ({job.previous_error});"
                          " retrying it, resuming the work it stored", markup=False)
        if not args.wait:
            return EXIT_OK
        job = follow(client, job.id)
        print_summary(job)
        return job_outcome(job)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Follow a job until it ends."""
    with NeurodissectClient(settings) as client:
        job = follow(client, args.job)
        print_summary(job)
        return job_outcome(job)


def job_dict(job: common_pb2.Job) -> dict[str, Any]:
    """A job as a JSON-ready dict (protobuf JSON mapping, proto field names)."""
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print a job's state, stages, error and summaries."""
    with NeurodissectClient(settings) as client:
        job = client.get(args.job)
    if args.format == "json":
        print(json.dumps(job_dict(job), indent=1))
        return EXIT_OK
    console.print(f"job:   {job.id} {job.spec.name}", markup=False)
    console.print(f"state: {state_name(job.state)}", markup=False)
    if job.error:
        console.print(f"error: {job.error}", markup=False)
    console.print(stages_table(job))
    print_summary(job)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """List jobs, newest first."""
    states = [common_pb2.JobState.Value(s) for s in args.state or []]
    with NeurodissectClient(settings) as client:
        jobs = client.jobs(states=states, limit=args.limit)
    if args.format == "json":
        print(json.dumps([job_dict(job) for job in jobs], indent=1))
        return EXIT_OK
    console.print(jobs_table(jobs))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel a job."""
    with NeurodissectClient(settings) as client:
        job = client.cancel(args.job)
    console.print(f"job {job.id}: {state_name(job.state)}", markup=False)
    return EXIT_OK


def cmd_describe_model(args: argparse.Namespace, settings: Settings) -> int:
    """Print a model's layers with their output shapes."""
    model = common_pb2.ModelSpec(
        source=args.source, name=args.name or "", weights_uri=args.weights or "",
        input_size=args.input_size or 0,
    )
    with NeurodissectClient(settings) as client:
        described = client.describe_model(model)
    if args.format == "json":
        print(json.dumps(json_format.MessageToDict(
            described, preserving_proto_field_name=True), indent=1))
        return EXIT_OK
    rows = [(layer.name, "×".join(str(d) for d in layer.shape), layer.module_type)
            for layer in described.layers]
    if not console.is_terminal:
        # Piped: whole names, one tab-separated line per layer, for cut/grep/awk.
        sys.stdout.write("".join(f"{name}\t{shape}\t{module}\n" for name, shape, module in rows))
        return EXIT_OK
    console.print(layers_table(f"{args.source}/{args.name}", rows))
    return EXIT_OK


def _job_layers(client: NeurodissectClient, job_id: str, layer: str) -> list[str]:
    return [layer] if layer else list(client.get(job_id).spec.layers)


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    """Print every method's answer per unit of a layer."""
    filters = {
        "detectors_only": args.detectors_only, "label": args.label or "",
        "min_iou": args.min_iou or 0.0, "significant_only": args.significant_only,
    }
    with NeurodissectClient(settings) as client:
        layers = _job_layers(client, args.job, args.layer)
        if args.format == "json" and len(layers) > 1:
            errors.print("--format json needs --layer (the job has several layers)")
            return EXIT_REJECTED
        for layer in layers:
            units = list(client.units(args.job, layer, **filters))
            if args.format == "json":
                print(json.dumps([results.unit_dict(u) for u in units], indent=1))
            elif args.format == "csv":
                sys.stdout.write(results.table_csv(layer, units))
            else:
                console.print(results_table(layer, units, args.limit))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write a layer's results in an export format, to --out or stdout."""
    with NeurodissectClient(settings) as client:
        text = client.export(args.job, args.layer, args.format)
    if args.out:
        Path(args.out).write_text(text)
        console.print(f"wrote {args.out}", markup=False)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    """Write a job's pages as a self-contained static folder, read from the store."""
    out = Path(args.out or f"report-{args.job}")
    files, stored = copy_report(settings.open_store(), args.job, out)
    how = "the job's stored copy" if stored else "built from the store now"
    console.print(f"wrote {files} files to {out} ({how})", markup=False)
    if args.open:
        webbrowser.open((out / "index.html").resolve().as_uri())
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """Write one unit's activation mask on a probe image (default: its top exemplar)."""
    peers = Peers(settings)
    try:
        png, image = unit_overlay(
            settings.open_store(), peers.materialize, args.job, args.layer, args.unit,
            args.image, args.size,
        )
    finally:
        peers.close()
    Path(args.out).write_bytes(png)
    console.print(f"wrote {args.out}: layer {args.layer} unit {args.unit} on image {image}",
                  markup=False)
    return EXIT_OK


def cmd_toyworld_generate(args: argparse.Namespace, settings: Settings) -> int:
    """Write the toy world dataset (Broden format) to --out."""
    from services.toyworld.generator import generate

    root = generate(Path(args.out), n_images=args.n, image_size=args.size, seed=args.seed)
    console.print(f"toy world: {args.n} images at {args.size}px in {root}", markup=False)
    return EXIT_OK


def cmd_toyworld_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train the toy models by their default recipes and ship them (commit the files)."""
    from services.cli.toy_models import train_toy_models
    from services.toyworld.shipped import WEIGHTS_DIR

    out = Path(args.out) if args.out else WEIGHTS_DIR
    train_toy_models(out, tuple(args.models), say=lambda text: console.print(text, markup=False))
    return EXIT_OK


# -- the demo ------------------------------------------------------------------------------

def demo_layers(described: common_pb2.DescribeModelResponse, count: int = 2) -> list[str]:
    """The last `count` top-level layers with a spatial map: the demo dissects those."""
    spatial = [
        layer.name for layer in described.layers
        if "." not in layer.name and len(layer.shape) == 3 and layer.shape[1] > 1
    ]
    return spatial[-count:]


def available_methods(services: Sequence[str]) -> list[str]:
    """Methods whose implementation is installed and whose service runs."""
    found = []
    for method in METHODS:
        service, module = (
            ("captioner", "services.captioner.server")
            if method == "milan"
            else ("explainer", f"services.explainer.{method}")
        )
        try:
            if service in services and importlib.util.find_spec(module) is not None:
                found.append(method)
        except ModuleNotFoundError:
            continue
    return found


DEMO_OCCLUSION_REGIONS = 400


def demo_spec(
    layers: Sequence[str], methods: Sequence[str], n_images: int, image_size: int
) -> common_pb2.DissectionSpec:
    """The demo dissection: toynet on the toy world by every available method."""
    spec = common_pb2.DissectionSpec(
        name="demo: toynet on the toy world",
        model=common_pb2.ModelSpec(source="toy", name="toynet"),
        layers=layers,
        dataset=common_pb2.DatasetSpec(
            kind="toyworld",
            toyworld=common_pb2.ToyWorldParams(n_images=n_images, image_size=image_size),
        ),
    )
    toy_clip = common_pb2.ClipModelSpec(arch="toy")
    for method in methods:
        getattr(spec, method).SetInParent()
    if "clip_dissect" in methods:
        spec.clip_dissect.clip.CopyFrom(toy_clip)
    if "simulation" in methods:
        spec.simulation.simulator.CopyFrom(toy_clip)
    if "milan" in methods:
        spec.milan.checkpoint_uri = "toy"
    if "occlusion" in methods:
        # The mean fill is the one the planted known answer holds for; a few hundred
        # regions keep the demo's extra forward passes to seconds.
        spec.occlusion.fill = "mean"
        spec.occlusion.max_regions = DEMO_OCCLUSION_REGIONS
    return spec


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Start the local stack, run the demo dissection, print its results, stop the stack."""
    stack = start_stack(args, settings)
    try:
        print_stack(stack)
        with NeurodissectClient(stack.settings) as client:
            toynet = common_pb2.ModelSpec(source="toy", name="toynet")
            layers = demo_layers(client.describe_model(toynet))
            methods = available_methods(stack.services)
            console.print(f"dissecting toynet layers {', '.join(layers)} by {', '.join(methods)}")
            job = client.submit(demo_spec(layers, methods, args.n, args.size))
            console.print(f"job: {job.id}", markup=False)
            job = follow(client, job.id)
            if job.state != common_pb2.SUCCEEDED:
                return job_outcome(job)
            units = {layer: list(client.units(job.id, layer)) for layer in job.spec.layers}
            for layer in job.spec.layers:
                console.print(results_table(layer, units[layer], args.show))
            print_summary(job)
            block = figures_block(job, units)
            console.print(block, markup=False, highlight=False, soft_wrap=True)
            if args.readme:
                write_into(Path(args.readme), block)
                console.print(f"figures written into {args.readme}", markup=False)
        console.print(f"outputs, in the store {stack.settings.store_url}:", markup=False)
        console.print(f"  results  results/{job.id}/<layer>/<method>/u*.json", markup=False)
        console.print(f"  pages    reports/{job.id}/index.html", markup=False)
        console.print(f"they stay: `neurodissect up`, then `neurodissect results {job.id}"
                      f" --layer {job.spec.layers[-1]}`", markup=False)
        console.print(f"web UI (while `neurodissect up` runs): http://{settings.host}:"
                      f"{settings.ui_port}/jobs/{job.id}/index.html", markup=False)
        console.print(f"static copy: `neurodissect report {job.id} --out report-{job.id}"
                      " --open`", markup=False)
        return EXIT_OK
    finally:
        console.print("stopping the local stack")
        stack.stop()


# -- the parser ----------------------------------------------------------------------------

def _stack_flags(parser: argparse.ArgumentParser, free_ports_default: bool) -> None:
    parser.add_argument("--no-ray-head", dest="ray_head", action="store_false",
                        help="let the explainer start Ray in-process instead of a Ray head")
    parser.add_argument("--free-ports", dest="free_ports", action="store_true",
                        default=free_ports_default, help="pick free ports instead of the defaults")
    parser.add_argument("--log-dir", default="var/log", help="service logs (default var/log)")
    parser.add_argument("--extractors", type=int, default=1, metavar="N",
                        help="extractor processes that share each job's images, each with "
                             "usable cores / N torch threads (default 1)")


def _spec_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="spec file: protobuf JSON mapping or YAML")
    parser.add_argument("--model-source", help="torchvision | timm | torchscript | toy")
    parser.add_argument("--model", help="architecture name (e.g. resnet18, toynet)")
    parser.add_argument("--weights", help="local weight file")
    parser.add_argument("--preprocessing", help="imagenet | netdissect | clip")
    parser.add_argument("--layers", help="comma-separated layer names")
    parser.add_argument("--dataset-kind", help="broden | imagefolder | toyworld")
    parser.add_argument("--dataset-uri", help="dataset directory")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument("--methods", help=f"comma-separated, any of {', '.join(METHODS)}")
    parser.add_argument("--clip-arch", help="CLIP for clip_dissect and simulation ('toy', ...)")
    parser.add_argument("--clip-weights", help="local CLIP checkpoint")
    parser.add_argument("--concept-set", help="CLIP-Dissect concept set file")
    parser.add_argument("--milan-checkpoint", help="captioner checkpoint ('toy' for the toy one)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--unit-block-size", type=int)
    parser.add_argument("--device", help="cpu | cuda | cuda:N")
    parser.add_argument("--idempotency-key")
    parser.add_argument("--name")
    parser.add_argument("--wait", action="store_true", help="follow the job with progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="neurodissect", description=__doc__.split("\n")[0])
    parser.add_argument("--store-url", help="file://PATH or s3://BUCKET[/prefix]")
    parser.add_argument("--gateway-addr", help="host:port of the gateway")
    parser.add_argument("--extractor-addr")
    parser.add_argument("--explainer-addr")
    parser.add_argument("--captioner-addr")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--timeout", type=float, help="deadline of unary calls, seconds")
    parser.add_argument("--cache-dir")
    parser.add_argument("--log-level")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    up = command("up", cmd_up, "start the local stack until Ctrl-C")
    _stack_flags(up, False)
    up.add_argument("--verbose", action="store_true",
                    help="print the memory (PSS) each process of the stack holds once started")
    serve = command("serve", cmd_serve, "run one service in the foreground")
    serve.add_argument("service", choices=SERVICES)
    _spec_flags(command("submit", cmd_submit, "submit a dissection"))
    command("watch", cmd_watch, "follow a job with live progress").add_argument("job")
    status = command("status", cmd_status, "a job's state, stages and summaries")
    status.add_argument("job")
    status.add_argument("--format", choices=("table", "json"), default="table")
    jobs = command("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--format", choices=("table", "json"), default="table")
    jobs.add_argument("--state", action="append", choices=[
        state_name(s) for s in common_pb2.JobState.values() if s])
    jobs.add_argument("--limit", type=int, default=0)
    command("cancel", cmd_cancel, "cancel a queued or running job").add_argument("job")
    describe = command("describe-model", cmd_describe_model, "a model's layers and shapes")
    describe.add_argument("--source", default="toy")
    describe.add_argument("--name", default="toynet")
    describe.add_argument("--weights")
    describe.add_argument("--input-size", type=int)
    describe.add_argument("--format", choices=("table", "json"), default="table")
    res = command("results", cmd_results, "every method's answer per unit")
    res.add_argument("job")
    res.add_argument("--layer", default="")
    res.add_argument("--format", choices=("table", "json", "csv"), default="table")
    res.add_argument("--detectors-only", action="store_true")
    res.add_argument("--label")
    res.add_argument("--min-iou", type=float)
    res.add_argument("--significant-only", action="store_true",
                     help="units whose NetDissect label passes the significance check")
    res.add_argument("--limit", type=int, default=0, help="table rows to show (0 = all)")
    export = command("export", cmd_export, "tally.csv, CLIP-Dissect or MILAN CSV of a layer")
    export.add_argument("job")
    export.add_argument("--layer", required=True)
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("--out", help="file to write (default stdout)")
    report = command("report", cmd_report, "a job's pages as a static folder")
    report.add_argument("job")
    report.add_argument("--out", help="folder to write (default report-JOB)")
    report.add_argument("--open", action="store_true", help="open it in a browser")
    show = command("show", cmd_show, "one unit's activation mask on a probe image, as PNG")
    show.add_argument("job")
    show.add_argument("--layer", required=True)
    show.add_argument("--unit", type=int, required=True)
    show.add_argument("--image", type=int, help="probe image id (default: the top exemplar)")
    show.add_argument("--size", type=int, default=224, help="longer side in pixels")
    show.add_argument("--out", required=True, help="PNG file to write")
    toy = commands.add_parser("toyworld", help="the toy world", description="the toy world")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    generate = toy_commands.add_parser("generate", help="write the toy world dataset")
    generate.set_defaults(handler=cmd_toyworld_generate)
    generate.add_argument("--out", required=True)
    generate.add_argument("--n", type=int, default=600)
    generate.add_argument("--size", type=int, default=64)
    generate.add_argument("--seed", type=int, default=0)
    train = toy_commands.add_parser("train", help=cmd_toyworld_train.__doc__)
    train.set_defaults(handler=cmd_toyworld_train)
    train.add_argument("--out", help="weights folder (default: the one that ships)")
    train.add_argument("--models", nargs="+", default=["toynet", "toy_clip", "toy_captioner"],
                       choices=["toynet", "toy_clip", "toy_captioner"])
    demo = command("demo", cmd_demo, "dissect toynet on the toy world on a local stack")
    _stack_flags(demo, True)
    demo.add_argument("--n", type=int, default=400, help="toy world images")
    demo.add_argument("--size", type=int, default=64, help="toy world image size")
    demo.add_argument("--show", type=int, default=16, help="units shown per layer")
    demo.add_argument("--readme", help="write the figures into this README's figures block")
    _register_captioner(commands)
    return parser


def _register_captioner(commands: Any) -> None:
    """Let the captioner add its own commands (`captioner train`) when it provides them."""
    try:
        spec = importlib.util.find_spec("services.captioner.cli")
    except ModuleNotFoundError:
        return
    if spec is not None:
        importlib.import_module("services.captioner.cli").add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `neurodissect` command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        handler: Handler = args.handler
        return handler(args, settings)
    except NeurodissectError as exc:
        errors.print(f"error: {exc.code.name}: {exc}", markup=False)
        return EXIT_REJECTED
    except grpc.RpcError as exc:
        code = exc.code()
        errors.print(f"error: {code.name}: {exc.details()}", markup=False)
        unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return EXIT_STACK_FAILED if unreachable else EXIT_REJECTED
    except StackError as exc:
        errors.print(f"error: the local stack did not start: {exc}", markup=False)
        return EXIT_STACK_FAILED


if __name__ == "__main__":
    sys.exit(main())
