"""What `edgeward check` says about the guard: every jail problem, with where it was written.

The schema already refuses what a type can say (a negative maxretry, a bad
address in ignoreip); this module adds what only the guard knows: whether a
filter loads and what it does not support, which sources exist, whether a
growth formula is allowed. `config_problems` is the check the config loader
runs (``loads(text, checks=(config_problems,))``) and the `Guard` refuses a
configuration for the same problems.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from edgeward.config.schema import Config, GuardSettings, JailSettings, ShareSettings

# (key path in the config, message, hint), e.g. (("jails", "prosody", "filter"), "...", "...")
Problem = tuple[tuple[str | int, ...], str, str]

HINT = "see `edgeward check` docs in docs/config.md"


def config_problems(cfg: Config) -> Iterator[Problem]:
    """Every problem of the config's jails (a check for `edgeward.config.loader.load`)."""
    yield from jail_problems(cfg.guard, cfg.jails)
    yield from share_problems(cfg.guard.share)
    yield from crowdsec_problems(cfg.guard)


def share_problems(share: ShareSettings) -> Iterator[Problem]:
    """[guard.share]'s files must be readable (the schema checked the URL; Redis itself being
    reachable is not a config problem: the edge starts and retries)."""
    for name in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(share, name)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            yield (("guard", "share", name), f"guard.share.{name}: cannot read {path}: {exc.strerror or exc}",
                   "give a readable file (the edge reads it at each connection to Redis)")


def crowdsec_problems(settings: GuardSettings) -> Iterator[Problem]:
    """Files named in [guard.crowdsec] that cannot be read (the schema checked the rest)."""
    cs = settings.crowdsec
    if cs is None:
        return
    for key in ("api_key_file", "password_file", "ca_cert_path", "cert_path", "key_path"):
        path = getattr(cs, key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                empty = not f.read(65536).strip()
        except OSError as e:
            yield ("guard", "crowdsec", key), f"[guard.crowdsec] {key}: cannot read {path}: {e.strerror}", HINT
            continue
        if empty:
            yield ("guard", "crowdsec", key), f"[guard.crowdsec] {key}: {path} is empty", HINT


def jail_problems(settings: GuardSettings, jails: Mapping[str, JailSettings]) -> Iterator[Problem]:
    """Every problem of `jails` run with `settings` (none: the guard can run them).

    Warnings are not problems: a regex with nested repetition still runs (bounded
    by the matcher's deadline) and is named in the log when a batch times out.
    """
    if not jails:
        return
    # Here, not at the top: every `edgeward` command imports this module to pass the
    # check, and only a config with jails needs the filter engine (~20 ms to import).
    from edgeward.guard.build import (
        CROWDSEC_JAIL,
        MANUAL_JAIL,
        GuardError,
        build_filter,
        build_jail,
        filter_search_path,
    )
    from edgeward.guard.datedetect import DatePatternError, parse_tz_offset
    from edgeward.guard.jail import JailError, compile_formula

    search_path = filter_search_path(settings)
    for name, jail in jails.items():
        at = ("jails", name)
        if name in (MANUAL_JAIL, CROWDSEC_JAIL):
            yield at, f"jail {name}: duplicate or reserved name", HINT
        for i, src in enumerate(jail.sources):
            if not (src.startswith("edge:") and len(src) > 5) and src != "journal":
                yield ((*at, "sources", i), f"jail {name}: unknown source {src!r} (edge:<kind> or journal)",
                       HINT)
        if not jail.logpath and not jail.sources:
            yield at, f"jail {name}: no logpath and no sources", HINT
        if jail.logtimezone is not None:
            try:
                parse_tz_offset(jail.logtimezone)
            except DatePatternError as exc:
                yield (*at, "logtimezone"), f"jail {name}: {exc}", HINT
                continue
        if jail.bantime == 0:
            yield (*at, "bantime"), f"jail {name}: bantime must not be 0 (negative bans forever)", HINT
            continue
        if jail.increment is not None and jail.increment.formula:
            try:
                compile_formula(jail.increment.formula)
            except JailError as exc:
                yield (*at, "increment", "formula"), f"jail {name}: {exc}", HINT
                continue
        where = (*at, "filter") if jail.filter else (*at, "failregex") if jail.failregex else at
        try:
            flt = build_filter(name, jail, search_path)
            build_jail(name, jail, settings, flt)
        except GuardError as exc:
            yield where, str(exc), HINT
            continue
        except JailError as exc:
            text = str(exc)
            yield at, text if text.startswith("jail ") else f"jail {name}: {text}", HINT
            continue
        if flt is not None:
            for u in flt.unsupported:
                if "may backtrack" not in u:
                    yield where, f"jail {name}: {u}", HINT
