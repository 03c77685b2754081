"""``meshd``: the daemon's command line.

It never daemonizes (systemd does that) and never prints a traceback for a
user error: a bad configuration is a list of problems and exit status 2; a join
token that does not parse is exit status 4, which ``systemd/meshd.service`` lists in
``RestartPreventExitStatus=`` (restarting cannot mend a token).
"""

from __future__ import annotations

import argparse
import logging
import sys

from meshd import __version__
from meshd import config as configmod

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BAD_TOKEN = 4  # RestartPreventExitStatus= in systemd/meshd.service

log = logging.getLogger("meshd")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshd",
        description=(
            "Pool the GPUs of many machines into one mesh for LLM inference, with one "
            "OpenAI-compatible API on every node. Runs in the foreground (systemd "
            "Type=notify); SIGTERM or Ctrl-C leaves the mesh cleanly and exits 0, "
            "SIGHUP reloads."
        ),
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH}; "
        "a missing default file means all defaults)",
    )
    p.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        action="append",
        help="model to serve: a GGUF path, a name in the models directory or catalog, or "
        "hf:REPO/FILE; repeat for models the mesh should also serve (replaces [models] serve)",
    )
    p.add_argument(
        "--join",
        metavar="TOKEN",
        action="append",
        help="invite token of the mesh to join; repeat to give fallbacks (replaces [mesh] join)",
    )
    p.add_argument(
        "--client",
        action="store_true",
        help="API-only client: serve nothing, route every request into the mesh ([node] client)",
    )
    p.add_argument(
        "--split",
        action="store_true",
        help="split the model even when it fits one node ([models] split): its group "
        "elects one host, which runs llama-server over the others' rpc-servers (the "
        "peers within [models] max_rtt_ms; none near: solo)",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (and plugins and models), print the effective "
        "configuration and exit 0, or print every problem and exit 2",
    )
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    return p


def effective_config(args: argparse.Namespace) -> configmod.Config:
    """The file's configuration with command-line flags on top (flag > file > default)."""
    config = configmod.load(args.config)
    if args.model:
        config = config.replace("models", serve=list(args.model))
    if args.join:
        config = config.replace("mesh", join=list(args.join))
    if args.client:
        config = config.replace("node", client=True)
    if args.split:
        config = config.replace("models", split=True)
    problems = configmod.validate(config)
    if problems:
        raise configmod.ConfigError([f"{config.path or 'command line'}: {p}" for p in problems])
    return config


def check(config: configmod.Config, plugin_order: list[str] | None = None) -> list[str]:
    """Problems that need more than the schema: model files, plugins (``plugin_order``
    receives the plugins that loaded, in the order they are asked)."""
    from meshd.daemon import service

    return service.preflight(config, plugin_order)


def bad_join_tokens(config: configmod.Config) -> list[str]:
    """Join tokens that do not parse: the daemon never starts with them (EXIT_BAD_TOKEN)."""
    from meshd.daemon import service

    return service.join_token_problems(config)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = effective_config(args)
    except configmod.ConfigError as e:
        for problem in e.problems:
            print(f"meshd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    order: list[str] = []
    problems = check(config, order)
    bad_tokens = bad_join_tokens(config)
    if args.check_config:
        problems += bad_tokens
        if problems:
            for problem in problems:
                print(f"meshd: {problem}", file=sys.stderr)
            names = ", ".join(line.partition(" ")[0] for line in order) or "none"
            print(f"meshd: policy plugins that did load, asked in this order: {names}",
                  file=sys.stderr)
            return EXIT_CONFIG
        print(configmod.dumps(config), end="")
        # comments, so that the output stays the effective configuration file
        print("\n# policy plugins, asked in this order (first answer wins):")
        for i, line in enumerate(order, 1):
            print(f"#   {i}. {line}")
        return EXIT_OK
    if bad_tokens:  # asked to join with what can never work: never found a mesh instead
        for problem in problems + bad_tokens:
            print(f"meshd: {problem}", file=sys.stderr)
        return EXIT_BAD_TOKEN
    if problems:
        for problem in problems:
            print(f"meshd: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    from meshd import logs
    from meshd.daemon import service

    logs.setup(config.log.level, fmt=config.log.format)
    # a reload reads the file again, the command-line flags still on top
    return service.run(config, reread=lambda: effective_config(args))


if __name__ == "__main__":
    sys.exit(main())
