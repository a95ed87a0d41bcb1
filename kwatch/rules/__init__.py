"""Rules: the changedfiles config format and the TOML config, parsed into one model, and rule matching.

- ``model``         Config, RuleSet, Rule, Action, ProcessFilter, ReplicateTarget; operation keywords. Pure.
- ``changedfiles``  the changedfiles format, unchanged (RULE / IGNORE / OPENW ... lines). Pure.
- ``tomlconf``      the TOML format (rule sets, process filters, options, [[replicate]]). Pure.
- ``build``         checks shared by both formats (commands, batch options). Pure.
- ``match``         match_config / match_ruleset(event) -> Match(rule, action, placeholder values). Pure.
- ``errors``        ConfigError (file, line, reason) and ConfigErrors.
- ``load``          reading files: load_config, check_config, load_default_config (embedded ``default.conf``);
                    the checks of files (kwatch.filesafety), accounts and password files a config needs
                    before it is trusted.
- ``procfs``        process ancestry from /proc for process filters (the daemon passes it to match).
- ``shell``         the action command language: parsing, placeholder compilation, quoting, exec specs. Pure.
- ``runas``         an action's ``user``/``group`` resolved against pwd/grp; whether we can switch to it.
"""

from kwatch.rules.errors import ConfigError, ConfigErrors
from kwatch.rules.load import check_config, load_config, load_default_config, parse_config
from kwatch.rules.match import Match, ProcessTree, config_alerts, match_config, match_ruleset
from kwatch.rules.model import (
    KEYWORD_OPS,
    Action,
    ActionOptions,
    BatchMode,
    Config,
    ProcessFilter,
    ReplicateTarget,
    Rule,
    RuleSet,
    Where,
)

__all__ = [
    "KEYWORD_OPS",
    "Action",
    "ActionOptions",
    "BatchMode",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "Match",
    "ProcessFilter",
    "ProcessTree",
    "ReplicateTarget",
    "Rule",
    "RuleSet",
    "Where",
    "check_config",
    "config_alerts",
    "load_config",
    "load_default_config",
    "match_config",
    "match_ruleset",
    "parse_config",
]
