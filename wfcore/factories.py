"""The factory contract: how a registered component is made from its config section.

A registration hook (``wfcore.hookspecs``) returns ``{name: factory}``. Every factory is
called the same way (``wfcore.manager.Plugins.create``):

1. **Options.** The factory may carry an ``Options`` attribute: a dataclass whose fields
   are the config keys of its section, each with its default (a factory without one takes
   no options and is given ``{}``). The section's values are checked against it (an
   unknown key or a wrong type is a one-line error naming ``<section>.<key>``), then its
   ``validate()``, when it has one, is called: it raises ``ValueError`` with a message that
   names the option, and the error names the config key and the plugin.
2. **Arguments.** The factory is called with the options instance first, then the
   arguments its kind declares in ``SIGNATURES`` (``data`` positionally for a data set;
   ``num_classes`` and ``input_shape`` by name for a model), ``target=`` for a name
   served by a prefix (``torchvision:resnet50`` -> ``target="resnet50"``), and the
   optional arguments (``seed``) only when its signature declares them (or ``**kwargs``).
3. **Failures.** An exception other than a ``WfcoreError`` is the plugin's failure: one
   line naming the config key, the plugin and the name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class Validated(Protocol):
    """An ``Options`` dataclass with a check across its fields (ranges, combinations).

    ``validate()`` raises ``ValueError`` whose message names the offending option; the
    caller turns it into a one-line ConfigError naming the config section.
    """

    def validate(self) -> None: ...


class Factory(Protocol[T_co]):
    """A registered factory: the validated options first, then its kind's arguments
    (``SIGNATURES``). ``Options`` (optional attribute): the dataclass of its options.
    ``Factory[HessianEstimator]`` is an estimator's; ``Plugins.create`` is typed per kind."""

    def __call__(self, options: Any, /, *args: Any, **kwargs: Any) -> T_co: ...


@dataclass(frozen=True)
class FactorySignature:
    """The arguments a factory of one kind is called with, after its options."""

    product: str  # what it returns (for messages and docs)
    positional: tuple[str, ...] = ()  # always given, in this order, after the options
    keywords: tuple[str, ...] = ()  # always given by name
    optional: tuple[str, ...] = ("seed",)  # given only when the factory declares them


# One entry per registration hook of wfcore.hookspecs (``wfcore_<kind>``). ``hooks``
# registers Options dataclasses only: they are validated, never called with arguments.
SIGNATURES: dict[str, FactorySignature] = {
    "estimators": FactorySignature("HessianEstimator"),
    "scorers": FactorySignature("Scorer"),
    "allocators": FactorySignature("Allocator"),
    "schedulers": FactorySignature("Scheduler"),
    "exporters": FactorySignature("Exporter"),
    "models": FactorySignature("nn.Module", keywords=("num_classes", "input_shape")),
    "datasets": FactorySignature("DataBundle", positional=("data",)),
    "hooks": FactorySignature("Options", optional=()),
}
PREFIX_ARGUMENT = "target"  # what a prefix name (``timm:``) gives its factory by name

def declares(factory: Any, name: str) -> bool:
    """Whether ``factory`` takes ``name`` as a keyword: a parameter of that name (not
    positional-only), or ``**kwargs``. False when its signature cannot be read."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False
    return any(p.kind is p.VAR_KEYWORD or
               (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


def arguments(kind: str, factory: Any, given: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(positional, keyword) arguments, after the options, for a factory of ``kind`` from
    the ``given`` ones: those its kind declares, the optional ones only where the factory
    takes them, and ``target`` (a prefix name's). Anything else given is a caller's bug."""
    signature = SIGNATURES[kind]
    known = {*signature.positional, *signature.keywords, *signature.optional, PREFIX_ARGUMENT}
    missing = [a for a in (*signature.positional, *signature.keywords) if a not in given]
    unknown = sorted(set(given) - known)
    if missing or unknown:
        raise TypeError(f"a {kind[:-1]} factory takes "
                        f"{(*signature.positional, *signature.keywords)} and optionally "
                        f"{signature.optional}: missing {missing}, unknown {unknown}")
    args = [given[a] for a in signature.positional]
    kwargs = {a: given[a] for a in signature.keywords}
    kwargs.update({a: given[a] for a in signature.optional if a in given and declares(factory, a)})
    if PREFIX_ARGUMENT in given:
        kwargs[PREFIX_ARGUMENT] = given[PREFIX_ARGUMENT]
    return args, kwargs
