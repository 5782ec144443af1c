"""``selectors``: the registry of importance selectors, with each one's paper, cost and options
(``importance`` and ``evaluate-selectors`` are specs: :mod:`analysis.specs.importance`)."""

from __future__ import annotations

_VALUE_WORDS = {bool: "true|false", int: "INT", float: "NUMBER", str: "TEXT"}  # declared types, in `selectors`


def cmd_selectors(args) -> int:
    from analysis.importance.selectors import SELECTORS
    from analysis.specs.importance import FLAGS

    for name, e in SELECTORS.items():
        print(f"{name:<18} {e.label}")
        print(f"{'':<18} {e.description}")
        print(f"{'':<18} granularity: {', '.join(e.granularities)}; data: {'yes' if e.needs_data else 'no'}; "
              f"cost: {e.cost}")
        print(f"{'':<18} paper: {e.paper}")
        kinds = e.option_types()
        for opt, help_ in e.options.items():
            value = "|".join(_VALUE_WORDS[t] for t in kinds[opt])
            print(f"{'':<18} {FLAGS[opt] + ' …' if opt in FLAGS else f'--option {opt}={value}'}  {help_}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("selectors", help="list the importance selectors")
    s.set_defaults(func=cmd_selectors)
