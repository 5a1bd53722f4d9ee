"""Register the testbed with the lab's API server, as a kubelet-less cluster would hold it.

What a real cluster has and the lab has not (kubelet, scheduler, controller-manager) is done
here through the API: Nodes are created with their fabric address; Pods are created bound to
their node (``spec.nodeName``) and then marked Running and Ready with ``status.podIP`` = the pod
netns address through the ``status`` subresource, as a kubelet reports them; ServiceAccounts are
created explicitly (no token controller makes ``default``). Services get the testbed's VIPs as
ClusterIPs; istiod builds ambient workloads and service membership from Pods and Services
(EndpointSlices only matter for selector-less Services), so no endpoint controller runs.

Each node also gets its ``ztunnel`` pod in ``istio-system`` (service account ``ztunnel``), and
the token its daemon presents is a bound token for that pod with audience ``istio-ca`` from the
TokenRequest API: what the chart's projected ``istio-token`` volume holds.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tools.lab.controlplane import ISTIO_NAMESPACE, ControlPlane
from tools.testbed.plan import NodePlan, PodPlan, ServicePlan, TestbedPlan, make_plan

AMBIENT_LABEL = "istio.io/dataplane-mode"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"  # istio-cni sets it once it redirects
ZTUNNEL_SA = "ztunnel"
TOKEN_AUDIENCE = "istio-ca"
TOKEN_SECONDS = 24 * 3600


def lab_plan(
    tag: str, nodes: int, pods_per_node: int, namespaces: Mapping[int, str]
) -> TestbedPlan:
    """The testbed plan with pod index ``j`` of every node in namespace ``namespaces[j]`` (its
    Service ``app-j`` follows); ``echo``, which spans namespaces, is left out."""
    plan = make_plan(tag, nodes, pods_per_node)
    pods = tuple(
        replace(p, namespace=namespaces[p.index], uid=f"{namespaces[p.index]}/{p.name}")
        for p in plan.pods
    )
    services = tuple(
        replace(s, namespace=namespaces[int(s.name.rsplit("-", 1)[1])])
        for s in plan.services
        if s.name != "echo"
    )
    return replace(plan, pods=pods, services=services)


def ztunnel_pod_name(node: str) -> str:
    return f"ztunnel-{node}"


class LabCluster:
    """Typed helpers over the Kubernetes Python client for what the lab registers."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        # The generated client's optional-everywhere models would need a None check per
        # field; the lab reads what it just wrote, so the APIs are held as Any.
        self.api_client: Any = k8s.ApiClient(_configuration(cp))
        self.core: Any = k8s.CoreV1Api(self.api_client)
        self.custom: Any = k8s.CustomObjectsApi(self.api_client)

    def close(self) -> None:
        self.api_client.close()

    # ------------------------------------------------------------------ whole testbed

    def register(self, plan: TestbedPlan, ambient: Iterable[str]) -> None:
        """Nodes, namespaces (``ambient`` ones labelled), service accounts, pods, services and the
        ztunnel pods of ``plan``."""
        ambient = set(ambient)
        for node in plan.nodes:
            self.create_node(node)
        for ns in sorted({p.namespace for p in plan.pods}):
            self.create_namespace(ns, ambient=ns in ambient)
        for ns, sa in sorted({(p.namespace, p.service_account) for p in plan.pods}):
            self.create_service_account(ns, sa)
        self.create_service_account(ISTIO_NAMESPACE, ZTUNNEL_SA)
        for svc in plan.services:
            self.create_service(svc)
        for pod in plan.pods:
            self.create_pod(pod)
        for node in plan.nodes:
            self.create_ztunnel_pod(node)

    # ------------------------------------------------------------------ objects

    def create_node(self, node: NodePlan) -> None:
        body = k8s.V1Node(
            metadata=k8s.V1ObjectMeta(name=node.name, labels={"kubernetes.io/hostname": node.name}),
            spec=k8s.V1NodeSpec(pod_cidr=node.pod_cidr, pod_cidrs=[node.pod_cidr]),
        )
        self.core.create_node(body)
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.fabric_ip},
                    {"type": "Hostname", "address": node.name},
                ],
                "conditions": [_condition("Ready", "KubeletReady")],
            }
        }
        self.core.patch_node_status(node.name, status)

    def create_namespace(self, name: str, *, ambient: bool) -> None:
        labels = {AMBIENT_LABEL: "ambient"} if ambient else {}
        self.core.create_namespace(
            k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels))
        )

    def set_ambient(self, namespace: str, enabled: bool) -> None:
        """Label (or unlabel) a namespace for ambient, as ``kubectl label`` / istioctl do."""
        value = "ambient" if enabled else None
        self.core.patch_namespace(namespace, {"metadata": {"labels": {AMBIENT_LABEL: value}}})

    def create_service_account(self, namespace: str, name: str) -> None:
        try:
            self.core.create_namespaced_service_account(
                namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
            )
        except ApiException as e:
            if e.status != 409:  # already there
                raise

    def create_service(self, svc: ServicePlan) -> None:
        body = k8s.V1Service(
            metadata=k8s.V1ObjectMeta(name=svc.name, namespace=svc.namespace),
            spec=k8s.V1ServiceSpec(
                cluster_ip=svc.vip,
                selector={"app": svc.name},
                ports=[
                    k8s.V1ServicePort(
                        name=f"tcp-{port}", port=port, target_port=target, protocol="TCP"
                    )
                    for port, target in sorted(svc.ports.items())
                ],
            ),
        )
        self.core.create_namespaced_service(svc.namespace, body)

    def create_pod(self, pod: PodPlan) -> str:
        """Create the pod bound to its node and report it Running/Ready at its netns address;
        its Kubernetes UID."""
        return self._create_running_pod(
            pod.namespace,
            pod.name,
            pod.service_account,
            pod.node,
            pod.ip,
            labels={"app": pod.app},
        )

    def create_ztunnel_pod(self, node: NodePlan) -> str:
        return self._create_running_pod(
            ISTIO_NAMESPACE,
            ztunnel_pod_name(node.name),
            ZTUNNEL_SA,
            node.name,
            node.fabric_ip,
            labels={"app": "ztunnel"},
        )

    def _create_running_pod(
        self, namespace: str, name: str, sa: str, node: str, ip: str, labels: Mapping[str, str]
    ) -> str:
        body = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)),
            spec=k8s.V1PodSpec(
                node_name=node,
                service_account_name=sa,
                automount_service_account_token=False,
                containers=[k8s.V1Container(name="app", image="testbed/app:none")],
            ),
        )
        created = self.core.create_namespaced_pod(namespace, body)
        self.mark_running(namespace, name, ip)
        return str(created.metadata.uid)

    def mark_running(self, namespace: str, name: str, ip: str) -> None:
        """What the kubelet reports once the pod's containers run (status subresource)."""
        now = _now()
        status = {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [
                    _condition(kind, "", now)
                    for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": "app",
                        "image": "testbed/app:none",
                        "imageID": "",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                ],
            }
        }
        self.core.patch_namespaced_pod_status(name, namespace, status)

    def delete_pod(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)

    def pod(self, namespace: str, name: str) -> Any:
        return self.core.read_namespaced_pod(name, namespace)

    def annotate_redirection(self, namespace: str, name: str, enabled: bool) -> None:
        """istio-cni's mark that the pod's traffic is redirected to ztunnel (istiod then gives
        the workload the HBONE protocol)."""
        value = "enabled" if enabled else None
        self.core.patch_namespaced_pod(
            name, namespace, {"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}}
        )

    def ztunnel_token(self, node: str) -> str:
        """A bound token for the node's ztunnel pod, audience ``istio-ca`` (the chart's
        projected ``istio-token``)."""
        pod = self.pod(ISTIO_NAMESPACE, ztunnel_pod_name(node))
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(
                audiences=[TOKEN_AUDIENCE],
                expiration_seconds=TOKEN_SECONDS,
                bound_object_ref=k8s.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        resp = self.core.create_namespaced_service_account_token(
            ZTUNNEL_SA, ISTIO_NAMESPACE, request
        )
        return str(resp.status.token)

    # ------------------------------------------------------------------ Istio resources

    def apply_authorization_policy(
        self, namespace: str, name: str, spec: Mapping[str, Any]
    ) -> None:
        """Create or replace a ``security.istio.io/v1`` AuthorizationPolicy."""
        body: dict[str, Any] = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": dict(spec),
        }
        args = ("security.istio.io", "v1", namespace, "authorizationpolicies")
        try:
            current = self.custom.get_namespaced_custom_object(*args, name)
        except ApiException as e:
            if e.status != 404:
                raise
            self.custom.create_namespaced_custom_object(*args, body)
            return
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        self.custom.replace_namespaced_custom_object(*args, name, body)

    def delete_authorization_policy(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            "security.istio.io", "v1", namespace, "authorizationpolicies", name
        )


def _configuration(cp: ControlPlane) -> k8s.Configuration:
    config = k8s.Configuration()
    config.host = cp.apiserver_url
    config.ssl_ca_cert = str(cp.apiserver_ca)
    config.api_key = {"authorization": f"Bearer {cp.token}"}
    return config


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, reason: str, when: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True", "lastTransitionTime": when or _now()}
    if reason:
        cond["reason"] = reason
    return cond
