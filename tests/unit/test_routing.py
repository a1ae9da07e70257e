from zmesh.routing import LocalRouter


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple] = []

    def deliver(self, topic, payload, qos, retain, origin, properties) -> None:
        self.got.append((topic, payload, qos))


def test_one_delivery_per_subscriber_with_the_highest_granted_qos() -> None:
    router = LocalRouter()
    a, b = Sink(), Sink()
    router.subscribe(a, "x/+", 0)
    router.subscribe(a, "x/#", 1)
    router.subscribe(b, "x/y", 0)
    targets = dict(router.targets("x/y"))
    assert targets == {a: 1, b: 0}
    assert router.targets("z") == []


def test_cache_follows_subscription_changes() -> None:
    router = LocalRouter()
    a = Sink()
    assert router.targets("t") == []
    router.subscribe(a, "t", 0)
    assert router.targets("t") == [(a, 0)]
    router.unsubscribe(a, "t")
    assert router.targets("t") == []
    router.subscribe(a, "#", 0)
    router.remove(a)
    assert router.targets("t") == []


def test_mesh_prefixes_close_exact_filters_and_open_wildcards() -> None:
    router = LocalRouter()
    a = Sink()
    for filt in ("a/b", "a/+/c", "s/#", "$share/g/jobs/+"):
        router.subscribe(a, filt, 0)
    assert router.mesh_prefixes() == {b"a/b\x00", b"a/", b"s", b"jobs/"}
