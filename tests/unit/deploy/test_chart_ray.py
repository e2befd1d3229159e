"""The chart's Ray lockdown, rendered by Helm's own engine: token auth and a NetworkPolicy.

The chart's RayCluster requires Ray's token (RAY_AUTH_MODE=token, the token from a
Secret the chart makes or one the user names); the explainer, the one Ray driver,
gets the same token; Ray pods hold no API token and no object-store keys; and a
NetworkPolicy lets only the explainer and the Ray pods reach the Ray pods.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_chart import (
    FULLNAME,
    VALUE_SETS,
    container_env,
    named,
    of_kind,
    pod_specs,
    render,
    render_values,
    secret_data,
    workload,
)

RAY_SECRET = f"{FULLNAME}-ray-auth"
TOKEN_REF = {"secretKeyRef": {"name": RAY_SECRET, "key": "auth_token"}}


def auth_env(container: dict[str, Any]) -> dict[str, Any]:
    """RAY_AUTH_* entries of a container's env, as written in the manifest."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])
            if e["name"].startswith("RAY_AUTH_")}


def explainer_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    deployment = named(objects, "Deployment", f"{FULLNAME}-explainer")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_ray_cluster_and_only_the_explainer_hold_the_ray_token() -> None:
    _, objects = render("defaults")
    token = secret_data(objects, RAY_SECRET)
    assert token is not None and len(token["auth_token"]) >= 32
    ray_pods = [(where, spec) for where, spec in pod_specs(objects) if "RayCluster" in where]
    assert len(ray_pods) == 2  # the head and the one worker group
    for where, spec in ray_pods:
        for container in spec["containers"]:
            assert auth_env(container) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN_REF}
            env = container_env(objects, container)
            leaked = {"NEURODISSECT_AUTH_TOKEN", "NEURODISSECT_S3_ACCESS_KEY",
                      "NEURODISSECT_S3_SECRET_KEY"} & set(env)
            assert not leaked, f"{where}: {sorted(leaked)}"
    assert auth_env(explainer_container(objects)) == {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN_REF}
    for other in ("gateway", "extractor", "captioner"):
        pods = workload(objects, other)["spec"]["template"]["spec"]
        assert not auth_env(pods["containers"][0]), other


def test_a_named_secret_is_used_and_none_is_made() -> None:
    values = {**VALUE_SETS["defaults"], "ray": {"auth": {"existingSecret": "my-ray",
                                                          "tokenKey": "t"}}}
    _, objects = render_values(values)
    assert secret_data(objects, RAY_SECRET) is None
    ref = {"secretKeyRef": {"name": "my-ray", "key": "t"}}
    assert auth_env(explainer_container(objects))["RAY_AUTH_TOKEN"] == ref


@pytest.mark.parametrize("name", ["external-ray", "existing-secrets-local-ray"])
def test_without_the_charts_ray_cluster_there_is_no_ray_token_or_policy(name: str) -> None:
    _, objects = render(name)
    assert secret_data(objects, RAY_SECRET) is None
    assert not auth_env(explainer_container(objects))
    assert not of_kind(objects, "NetworkPolicy")


def test_an_external_cluster_gets_the_token_it_is_given() -> None:
    values = {**VALUE_SETS["external-ray"],
              "ray": {**VALUE_SETS["external-ray"]["ray"], "auth": {"existingSecret": "ext"}}}
    _, objects = render_values(values)
    assert auth_env(explainer_container(objects))["RAY_AUTH_TOKEN"] == {
        "secretKeyRef": {"name": "ext", "key": "auth_token"}}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_only_the_explainer_and_ray_pods_may_reach_the_ray_pods() -> None:
    _, objects = render("defaults")
    (policy,) = of_kind(objects, "NetworkPolicy")
    cluster = of_kind(objects, "RayCluster")[0]["spec"]
    ray_templates = [cluster["headGroupSpec"]["template"],
                     *(group["template"] for group in cluster["workerGroupSpecs"])]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert all(matches(selected, t["metadata"]["labels"]) for t in ray_templates)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule
    sources = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert set(map(len, rule["from"])) == {1}  # pod selectors only: no namespace or IP blocks
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")}
    allowed = {name for name, labels in pods.items()
               if any(matches(source, labels) for source in sources)}
    assert allowed == {f"{FULLNAME}-explainer"}
    assert all(any(matches(source, t["metadata"]["labels"]) for source in sources)
               for t in ray_templates)


def test_the_policy_can_be_turned_off() -> None:
    values = {**VALUE_SETS["defaults"], "ray": {"networkPolicy": False}}
    _, objects = render_values(values)
    assert not of_kind(objects, "NetworkPolicy")
