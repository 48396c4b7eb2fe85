"""``recurate``: a new selection from a finished run's stored scores and embeddings.

The rules are the preset's then ``rules`` (as in curate); with neither given, RUN's own rules are
applied again (to add a column with ``heads`` and keep the selection). ``heads`` declares score
columns computed from RUN's stored embeddings, with curate's keys (``arch``, ``weights``,
``label``); their checks are curate's (``CurateConfig.check_heads``/``head_specs``), so a way of
naming weights that curate learns, recurate takes too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardsmith.errors import ConfigError
from shardsmith.filters.presets import preset_rules
from shardsmith.filters.rules import BASE_RANGES, RuleError, RuleSet
from shardsmith.filters.scores import HeadSpec, ScoreSet, declared_score
from shardsmith.pipelines.config.curate import CurateConfig


@dataclass
class RecurateConfig:
    run: str = ""  # the OUTPUT of a finished curate (or recurate) run
    output: str = ""
    preset: str | None = None  # None and no rules: RUN's own rules; "none": no preset rules
    rules: list[str] = field(default_factory=list)  # added after the preset's rules
    heads: dict[str, dict] = field(default_factory=dict)  # NAME -> {arch, weights[, label]}, from the embeddings
    address: str | None = None
    overwrite: bool = False
    progress: bool = True
    report: bool = True

    def inherits_rules(self) -> bool:
        return self.preset is None and not self.rules

    def all_rules(self, run_rules: list[str] | None = None) -> list[str]:
        """The rules of this recurate; ``run_rules``: RUN's, used when none are given."""
        if self.inherits_rules():
            return list(run_rules or [])
        return preset_rules(self.preset) + list(self.rules) if self.preset else list(self.rules)

    def ruleset(self, scores: ScoreSet, run_rules: list[str] | None = None) -> RuleSet:
        try:
            return RuleSet.parse(self.all_rules(run_rules), ranges=scores.ranges())
        except RuleError as e:
            raise ConfigError(f"rules: {e}") from e

    def check_fields(self, rules: RuleSet, scores: ScoreSet, computed: set[str]) -> None:
        """Every field a rule reads is a score RUN computed (or a new head), or a field every row has."""
        plain = set(BASE_RANGES) | {"caption", "url", "key"}
        for rule in rules.rules:
            for need in rule.needs():
                if need in scores and need not in computed:
                    raise ConfigError(f"rule '{rule.name}' needs the {need!r} score, which {self.run} did not "
                                      f"compute; add it from the stored embeddings with --head {need}=ARCH:PATH")
                if need not in scores and need not in plain:
                    raise ConfigError(f"rule '{rule.name}': unknown field {need!r} (a new score: --head "
                                      f"{need}=ARCH:PATH); fields: {', '.join(scores.names + sorted(plain))}")

    def _as_curate(self) -> CurateConfig:
        return CurateConfig(heads=self.heads)

    def head_specs(self) -> dict[str, HeadSpec]:
        return self._as_curate().head_specs()

    def new_scores(self) -> list:
        return [declared_score(n, h["arch"], h.get("label")) for n, h in self.heads.items()]

    def fingerprint(self, run_fingerprint: dict, run_rules: list[str]) -> dict:
        out = {"run": self.run, "parent_fingerprint": run_fingerprint, "rules": self.all_rules(run_rules)}
        if self.heads:
            out["heads"] = {n: {"arch": h["arch"], "weights": h["weights"]} for n, h in self.heads.items()}
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "overwrite"}

    def validate(self) -> None:
        if not self.run:
            raise ConfigError("run: the OUTPUT folder of a finished curate run is required")
        if not self.output:
            raise ConfigError("output: an output path or URL is required")
        if self.run.rstrip("/") == self.output.rstrip("/"):
            raise ConfigError(f"output: {self.output} is RUN itself; recurate writes a new run beside it")
        if self.preset is not None:
            try:
                preset_rules(self.preset)
            except RuleError as e:
                raise ConfigError(f"preset: {e}") from e
        self._as_curate().check_heads()
        ScoreSet.for_run(self.new_scores())  # names and archs
        self.ruleset(ScoreSet.for_run(self.new_scores()))  # rule syntax (fields are checked against RUN)
