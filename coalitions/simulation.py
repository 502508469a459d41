"""The demo simulator behind `manage.py simulate`: agents wander to neighbouring H3
cells, spend energy as they move and regain it at rest, revise their beliefs, and the
members of coalitions see their contribution scores drift.

Every write goes through the services (agents_update_states, coalition_members_sync), so
the history, the metrics outbox, the cache and the websocket clients see the simulation
as they see any other writer. The rules:

- Deterministic: the same seed on the same data gives the same ticks.
- Bounded: a tick updates at most MAX_BATCH agents; agents never leave the area (a disk
  of H3 cells) their tenant occupied when the simulation started; energy stays in
  0..100 and scores in the services' range, pulled back towards where they started.
- One transaction per tick: its agent updates and score changes are written together or
  not at all. The simulation's picture of the tenant advances only when the tick
  commits, so a rolled-back tick leaves it matching the database.

Active agents move and spend energy; one that runs out rests (inactive) and moves again
once it has regained WAKE_ENERGY. Suspended agents are an operator's decision and are
left alone, as are agents without a location.
"""

import math
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal

import h3
import numpy as np
from django.core.exceptions import ValidationError
from django.db import transaction

from agents.models import Agent, AgentStatus, Tenant
from agents.services import agents_update_states
from agents.types import UNSET, AgentStateUpdate
from agents.validators import brief
from coalitions.models import CoalitionMember, CoalitionStatus
from coalitions.services import coalition_members_sync
from freeagentics.progress import NULL_PROGRESS, Progress

# A tick a tenth of a second apart reads as motion on a map, and costs one transaction
# of rate/10 agents.
TICKS_PER_SECOND = 10
MAX_RATE = 10_000
MAX_BATCH = 1_000
# An area smaller than this many rings around its centre would leave agents no room.
MIN_AREA_RADIUS = 2
# Energy an agent spends per move, and regains per tick at rest: 1..ENERGY_STEP.
ENERGY_STEP = 8
WAKE_ENERGY = 60
# How far one tick moves beliefs towards a fresh random distribution.
BELIEF_MIX = 0.2
BELIEF_STATES = 8
# One coalition's member scores drift about once a second (in turn), each by up to
# SCORE_STEP and pulled back towards its starting value, so an hour of drift stays within
# a few points of where it began.
SCORE_SECONDS = 1.0
SCORE_STEP = 2.5
SCORE_REVERSION = 0.05
SCORE_LIMIT = 999.99
# A run that falls this far behind its schedule starts the schedule again instead of
# bursting to catch up.
MAX_LAG_SECONDS = 1.0

TENANT_UNKNOWN = (
    "tenant: no tenant with slug {slug!r}; run `manage.py seed_demo` to create demo-city."
)
NO_AGENTS = (
    "tenant: {slug} has no active or inactive agent with a location to move; "
    "run `manage.py seed_demo` to load the demo agents."
)
RATE_RANGE = "rate: must be a number of updates per second in 0..{max} (not 0), got {value!r}."
TICKS_RANGE = "ticks: must be a positive integer, got {value!r}."
DURATION_RANGE = "duration: must be a positive number of seconds, got {value!r}."


@dataclass(slots=True)
class _Walker:
    agent_id: uuid.UUID
    cell: str
    energy: int
    status: str
    beliefs: np.ndarray


@dataclass(slots=True)
class _Member:
    agent_id: uuid.UUID
    score: float
    start: float


@dataclass(frozen=True, slots=True)
class TickPlan:
    """What one tick writes: agent updates, and the new scores of one coalition's members."""

    updates: tuple[AgentStateUpdate, ...]
    coalition_id: uuid.UUID | None = None
    scores: tuple[tuple[uuid.UUID, Decimal], ...] = ()


@dataclass(slots=True)
class SimulationReport:
    ticks: int = 0
    updates: int = 0
    scores: int = 0
    # Ticks refused by a service because the tenant changed under the simulation (an
    # agent deleted, a member removed); the simulation re-read the tenant after each.
    refused: int = 0
    seconds: float = 0.0
    stopped: bool = False
    # Updates that moved their agent to another cell.
    moved: int = 0

    @property
    def rate(self) -> float:
        return self.updates / self.seconds if self.seconds > 0 else 0.0


def _validated_rate(rate) -> float:
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or not 0 < rate <= MAX_RATE
    ):
        raise ValidationError({"rate": RATE_RANGE.format(max=MAX_RATE, value=brief(rate))})
    return float(rate)


def _distance(a: str, b: str) -> int | None:
    try:
        return h3.grid_distance(a, b)
    except h3.H3BaseException:
        # Across a pentagon's distortion, or too far apart: H3 has no grid distance.
        return None


class _Area:
    """Per H3 resolution, a disk of cells around the agents' mean position that holds them
    all: a move may not take an agent further from the centre than the disk's radius (or
    than it already is, for an agent that arrived from elsewhere)."""

    def __init__(self, cells: Iterable[str]):
        by_resolution = defaultdict(list)
        for cell in cells:
            by_resolution[h3.get_resolution(cell)].append(cell)
        self.disks: dict[int, tuple[str, int]] = {}
        for resolution, group in by_resolution.items():
            lat, lng = np.mean([h3.cell_to_latlng(cell) for cell in group], axis=0)
            centre = h3.latlng_to_cell(float(lat), float(lng), resolution)
            distances = [d for d in (_distance(centre, cell) for cell in group) if d is not None]
            self.disks[resolution] = (centre, max([MIN_AREA_RADIUS, *distances]))

    def allows(self, current: str, candidate: str) -> bool:
        disk = self.disks.get(h3.get_resolution(current))
        if disk is None:
            return True
        centre, radius = disk
        here, there = _distance(centre, current), _distance(centre, candidate)
        if here is None or there is None:
            return here is None
        return there <= max(radius, here)


def _entropy(p: np.ndarray) -> float:
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def _belief_start(value, rng: np.random.Generator) -> np.ndarray:
    """A probability vector to evolve from: the agent's own beliefs where they are one."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.size >= 2:
        p = value.astype(np.float64)
        if np.isfinite(p).all() and (p >= 0).all() and p.sum() > 0:
            return p / p.sum()
    return rng.dirichlet(np.ones(BELIEF_STATES))


class Simulation:
    """One tenant's agents and coalition members as the simulation last wrote them.
    Build it with simulation_prepare; tick() writes one tick, run() paces ticks."""

    def __init__(self, *, tenant: Tenant, rate: float, seed: int):
        self.tenant = tenant
        self.rate = _validated_rate(rate)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.walkers: list[_Walker] = []
        self.coalitions: list[tuple[uuid.UUID, list[_Member]]] = []
        self.ticks = 0
        self.load()
        self.area = _Area(w.cell for w in self.walkers)

    # Reading the tenant -------------------------------------------------------------

    def load(self) -> None:
        """(Re)read the agents to move and the members to score, in a fixed order (by id),
        so the same seed draws the same values for the same agents."""
        rows = (
            Agent.objects.filter(
                tenant=self.tenant,
                status__in=[AgentStatus.ACTIVE, AgentStatus.INACTIVE],
                location_h3__isnull=False,
            )
            .order_by("id")
            .values_list("id", "location_h3", "energy_level", "status", "belief_state")
        )
        walkers = [
            _Walker(agent_id, cell, energy, status, _belief_start(beliefs, self.rng))
            for agent_id, cell, energy, status, beliefs in rows.iterator(chunk_size=2000)
        ]
        if not walkers:
            raise ValidationError({"tenant": NO_AGENTS.format(slug=self.tenant.slug)})
        members = defaultdict(list)
        for coalition_id, agent_id, score in (
            CoalitionMember.objects.filter(coalition__tenant=self.tenant)
            .exclude(coalition__status=CoalitionStatus.DISSOLVED)
            .order_by("coalition_id", "agent_id")
            .values_list("coalition_id", "agent_id", "contribution_score")
        ):
            members[coalition_id].append(_Member(agent_id, float(score), float(score)))
        self.walkers = walkers
        self.coalitions = sorted(members.items())

    @property
    def batch_size(self) -> int:
        """Agents per tick: rate / TICKS_PER_SECOND, at least 1, at most MAX_BATCH and
        the agents there are."""
        wanted = max(1, round(self.rate / TICKS_PER_SECOND))
        return min(wanted, MAX_BATCH, len(self.walkers))

    @property
    def interval(self) -> float:
        """Seconds between ticks, so batch_size agents a tick make `rate` a second."""
        return self.batch_size / self.rate

    @property
    def score_every(self) -> int:
        """Ticks between score changes: about SCORE_SECONDS apart at the paced rate."""
        return max(1, round(SCORE_SECONDS / self.interval))

    # One tick -----------------------------------------------------------------------

    def plan_tick(self) -> TickPlan:
        """The next tick's writes, drawn from the generator (advancing it); writes nothing."""
        rng = self.rng
        chosen = rng.choice(len(self.walkers), size=self.batch_size, replace=False)
        updates = []
        for index in sorted(int(i) for i in chosen):
            walker = self.walkers[index]
            step = int(rng.integers(1, ENERGY_STEP + 1))
            cell, status = walker.cell, walker.status
            if walker.status == AgentStatus.ACTIVE:
                cell = self._neighbour(walker.cell, rng)
                energy = max(0, walker.energy - step)
                if energy == 0:
                    status = AgentStatus.INACTIVE
            else:
                energy = min(100, walker.energy + step)
                if energy >= WAKE_ENERGY:
                    status = AgentStatus.ACTIVE
            noise = rng.dirichlet(np.full(walker.beliefs.size, 0.5))
            beliefs = (1 - BELIEF_MIX) * walker.beliefs + BELIEF_MIX * noise
            beliefs /= beliefs.sum()
            updates.append(
                AgentStateUpdate(
                    walker.agent_id,
                    beliefs=beliefs,
                    energy_level=energy,
                    location_h3=cell if cell != walker.cell else UNSET,
                    status=status if status != walker.status else UNSET,
                    # The simulation's stand-in for variational free energy, which the
                    # metrics chart draws: uncertainty (the beliefs' entropy) plus fatigue.
                    free_energy=_entropy(beliefs) + (100 - energy) / 100,
                )
            )
        if not self.coalitions or self.ticks % self.score_every:
            return TickPlan(tuple(updates))
        turn = self.ticks // self.score_every
        coalition_id, members = self.coalitions[turn % len(self.coalitions)]
        scores = []
        for member in members:
            drift = rng.uniform(-SCORE_STEP, SCORE_STEP)
            score = member.score + drift + SCORE_REVERSION * (member.start - member.score)
            score = min(SCORE_LIMIT, max(-SCORE_LIMIT, score))
            scores.append((member.agent_id, Decimal(f"{score:.2f}")))
        return TickPlan(tuple(updates), coalition_id, tuple(scores))

    def _neighbour(self, cell: str, rng: np.random.Generator) -> str:
        candidates = [
            n for n in sorted(h3.grid_disk(cell, 1)) if n != cell and self.area.allows(cell, n)
        ]
        if not candidates:
            return cell
        return candidates[int(rng.integers(len(candidates)))]

    def apply(self, plan: TickPlan) -> None:
        """Write `plan` in one transaction. Raises ValidationError (nothing written) when a
        service refuses it, e.g. for an agent deleted since the simulation read the tenant."""
        with transaction.atomic():
            states = agents_update_states(tenant=self.tenant, updates=plan.updates)
            if plan.scores:
                coalition_members_sync(
                    tenant=self.tenant,
                    coalition_id=plan.coalition_id,
                    update=[
                        {"agent_id": agent_id, "contribution_score": score}
                        for agent_id, score in plan.scores
                    ],
                )
            # The picture advances with the database: an outer transaction that rolls
            # back (or this one failing) leaves it as it was.
            transaction.on_commit(lambda: self._advance(plan, states))

    def tick(self) -> TickPlan:
        """Plan and write one tick; returns what it wrote."""
        plan = self.plan_tick()
        self.apply(plan)
        return plan

    def _advance(self, plan: TickPlan, states) -> None:
        by_id = {w.agent_id: w for w in self.walkers}
        for update, state in zip(plan.updates, states, strict=True):
            walker = by_id.get(update.agent_id)
            if walker is None:
                continue
            walker.cell, walker.energy, walker.status = (
                state.location_h3,
                state.energy_level,
                state.status,
            )
            walker.beliefs = update.beliefs
        if plan.scores:
            members = dict(self.coalitions)[plan.coalition_id]
            new = dict(plan.scores)
            for member in members:
                member.score = float(new.get(member.agent_id, member.score))
        self.ticks += 1

    # Pacing -------------------------------------------------------------------------

    def run(
        self,
        *,
        ticks: int | None = None,
        duration: float | None = None,
        stop: threading.Event | None = None,
        progress: Progress = NULL_PROGRESS,
        clock: Callable[[], float] = time.monotonic,
    ) -> SimulationReport:
        """Tick every `interval` seconds until `ticks` ticks, `duration` seconds or `stop`
        is set (checked between ticks: a tick in flight always finishes). A tick a service
        refuses is skipped and the tenant re-read; two refusals in a row raise the
        ValidationError. Returns what was written."""
        if ticks is not None and (
            isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 1
        ):
            raise ValidationError({"ticks": TICKS_RANGE.format(value=brief(ticks))})
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not math.isfinite(duration)
            or duration <= 0
        ):
            raise ValidationError({"duration": DURATION_RANGE.format(value=brief(duration))})
        stop = stop or threading.Event()
        report = SimulationReport()
        total = ticks * self.batch_size if ticks is not None else None
        start = clock()
        next_at = start
        refused_last = False
        with progress.task(f"simulating {self.tenant.slug}", total, unit="updates") as task:
            while not stop.is_set():
                if ticks is not None and report.ticks >= ticks:
                    break
                if duration is not None and clock() - start >= duration:
                    break
                try:
                    plan = self.tick()
                except ValidationError:
                    if refused_last:
                        raise
                    refused_last = True
                    report.refused += 1
                    self.load()
                    continue
                refused_last = False
                report.ticks += 1
                report.updates += len(plan.updates)
                report.scores += len(plan.scores)
                report.moved += sum(u.location_h3 is not UNSET for u in plan.updates)
                now = clock()
                report.seconds = now - start
                task.update(report.updates, f"{report.ticks} ticks, {report.rate:.0f}/s")
                next_at += self.interval
                if next_at < now - MAX_LAG_SECONDS:
                    next_at = now
                delay = next_at - now
                if duration is not None:
                    delay = min(delay, start + duration - now)
                if delay > 0:
                    stop.wait(delay)
            report.stopped = stop.is_set()
            report.seconds = clock() - start
            task.finish(f"{report.ticks} ticks, {report.rate:.0f}/s")
        return report


def simulation_prepare(*, tenant_slug: str, rate: float, seed: int | None = None) -> Simulation:
    """A Simulation of the tenant `tenant_slug` at `rate` agent updates a second.
    `seed` None draws one (Simulation.seed says which, to repeat the run). Raises
    ValidationError for an unknown tenant, one without agents to move, or a bad rate."""
    rate = _validated_rate(rate)
    tenant = None
    if isinstance(tenant_slug, str):
        tenant = Tenant.objects.filter(slug=tenant_slug).first()
    if tenant is None:
        raise ValidationError({"tenant": TENANT_UNKNOWN.format(slug=brief(tenant_slug))})
    if seed is None:
        seed = secrets.randbelow(2**31)
    return Simulation(tenant=tenant, rate=rate, seed=seed)
