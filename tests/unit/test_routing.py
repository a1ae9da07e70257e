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


def test_prefix_changes_are_reference_counted() -> None:
    router = LocalRouter()
    a, b = Sink(), Sink()
    router.subscribe(a, "x/+", 0)
    router.subscribe(b, "x/#", 0)  # another filter, different prefix (b"x")
    router.subscribe(b, "x/+", 1)  # same prefix as a's: no new ZeroMQ subscription
    assert router.take_prefix_changes() == ({b"x/", b"x"}, set())
    router.subscribe(b, "x/+", 0)  # a re-grant changes nothing
    router.unsubscribe(a, "x/+")
    assert router.take_prefix_changes() == (set(), set())  # b still needs b"x/"
    router.remove(b)
    assert router.take_prefix_changes() == (set(), {b"x/", b"x"})
    assert router.mesh_prefixes() == set()
    router.subscribe(a, "t", 0)
    router.unsubscribe(a, "t")
    assert router.take_prefix_changes() == (set(), {b"t\x00"})
