/*
 * FreeAgentics real-time client: one tenant's agents over /ws/agents/, kept current.
 * No build step and no dependencies; a plain <script> defines window.AgentStream.
 *
 *   const stream = new AgentStream("/ws/agents/?tenant=demo-city", {
 *     onState(change) { ... change.kind is "reset" or "changes"; stream.agents is a Map ... },
 *     onStatus(status, detail) { ... "connecting", "open", "live", "resyncing",
 *                                    "reconnecting" (detail.delay, detail.code), "stopped" ... },
 *   });
 *   stream.start();
 *
 * The protocol (docs/README-live.md):
 * - update frames {seq, agent_id, type: agent.created|agent.updated|agent.deleted, data,
 *   timestamp}; {type: "conflated", seq, messages: [update frames]};
 * - {type: "ready", seq}: live from after seq (on a resumed connection, once the updates
 *   after resume_after were replayed);
 * - {type: "resync", seq, reason}: the gap since resume_after is older than the server's
 *   history; the client asks {action: "snapshot", id} and gets
 *   {type: "snapshot", seq, agents: [{agent_id, data}], id};
 * - {type: "overflow", dropped}: frames were dropped; the client reconnects with
 *   ?resume_after=<last seq> to fetch them;
 * - error and pong replies.
 *
 * Rules: keep the last seq; a frame whose seq is at most the last one is a duplicate and
 * is skipped (frames without seq, from servers before sequence numbers, are applied);
 * a snapshot sets the state and the last seq; per agent the highest data.version wins;
 * reconnect with exponential backoff (capped at maxDelay) and resume_after; close codes
 * 4400, 4401, 4403 and 4404 (bad request, unauthenticated, forbidden, unknown tenant)
 * stop the client, since trying again cannot help.
 */
(function (root) {
  "use strict";

  var STOP_CODES = [4400, 4401, 4403, 4404];
  var TRY_AGAIN_LATER = 1013;
  // The client's own close, to reconnect at once with resume_after (after overflow).
  var CLOSE_RESUME = 4000;
  var UPDATE_TYPES = { "agent.created": true, "agent.updated": true, "agent.deleted": true };
  // Deleted agents remembered so an older snapshot cannot bring them back; bounded.
  var MAX_TOMBSTONES = 10000;
  // A connection that stayed up this long resets the backoff.
  var STABLE_MS = 5000;

  function isSeq(value) {
    return typeof value === "number" && isFinite(value);
  }

  function socketUrl(url, lastSeq) {
    var base = root.location ? root.location.href : undefined;
    var parsed = new URL(url, base);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (lastSeq === null) parsed.searchParams.delete("resume_after");
    else parsed.searchParams.set("resume_after", String(lastSeq));
    return parsed.toString();
  }

  function AgentStream(url, options) {
    options = options || {};
    this.url = url;
    this.onState = options.onState || function () {};
    this.onStatus = options.onStatus || function () {};
    this.onFrame = options.onFrame || null;
    this.onError = options.onError || null;
    this.WebSocket = options.WebSocket || root.WebSocket;
    this.protocols = options.protocols;
    this.initialDelay = options.initialDelay === undefined ? 500 : options.initialDelay;
    this.maxDelay = options.maxDelay === undefined ? 10000 : options.maxDelay;
    this.pingInterval = options.pingInterval === undefined ? 25000 : options.pingInterval;
    this.random = options.random || Math.random;

    this.agents = new Map(); // agent_id -> data, as the latest frame carried it
    this.appliedSeq = new Map(); // agent_id -> seq of the frame that set it (or null)
    this.tombstones = new Map(); // agent_id -> seq of its agent.deleted (or null)
    this.lastSeq = null;
    this.haveSnapshot = false;
    this.snapshotSupported = true;
    this.pendingSnapshot = null;
    this.nextId = 0;
    this.status = "idle";
    this.stopped = true;
    this.socket = null;
    this.attempt = 0;
    this.openedAt = 0;
    this.resumeNow = false;
    this.timer = null;
    this.pinger = null;
    this.stats = {
      frames: 0,
      applied: 0,
      duplicates: 0,
      stale: 0,
      snapshots: 0,
      reconnects: 0,
      overflows: 0,
      errors: 0,
    };
  }

  /** Start from agents the page already has ([{agent_id, data}]); no seq is known yet. */
  AgentStream.prototype.seed = function (agents) {
    var self = this;
    (agents || []).forEach(function (item) {
      if (item && typeof item.agent_id === "string") {
        self.agents.set(item.agent_id, item.data || {});
        self.appliedSeq.set(item.agent_id, null);
      }
    });
    this._notify({ kind: "reset", agents: this.agents, stream: this });
    return this;
  };

  AgentStream.prototype.start = function () {
    if (!this.stopped) return this;
    this.stopped = false;
    this._connect();
    return this;
  };

  /** Close for good (no reconnect). */
  AgentStream.prototype.stop = function (reason) {
    this.stopped = true;
    clearTimeout(this.timer);
    this._stopPinging();
    var socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= 1) socket.close(1000, reason || "client stopped");
    this._setStatus("stopped", { reason: reason || "stopped" });
  };

  /** Send a JSON request; false when not connected. */
  AgentStream.prototype.send = function (request) {
    var socket = this.socket;
    if (!socket || socket.readyState !== 1) return false;
    socket.send(JSON.stringify(request));
    return true;
  };

  AgentStream.prototype.requestSnapshot = function () {
    this.nextId += 1;
    this.pendingSnapshot = this.nextId;
    this.send({ action: "snapshot", id: this.nextId });
  };

  // Connecting ------------------------------------------------------------------------

  AgentStream.prototype._connect = function () {
    var self = this;
    var socket;
    var url = socketUrl(this.url, this.lastSeq);
    this._setStatus("connecting", { url: url });
    try {
      socket = this.protocols ? new this.WebSocket(url, this.protocols) : new this.WebSocket(url);
    } catch (e) {
      this._reconnect({ code: 0, reason: String(e) });
      return;
    }
    this.socket = socket;
    socket.onopen = function () {
      if (socket !== self.socket) return;
      self.openedAt = Date.now();
      self._setStatus("open");
      // The page's own agents may predate the connection: the snapshot draws them all.
      if (!self.haveSnapshot && self.snapshotSupported) self.requestSnapshot();
      self._startPinging();
    };
    socket.onmessage = function (event) {
      if (socket === self.socket) self._receive(event.data);
    };
    socket.onclose = function (event) {
      if (socket !== self.socket) return;
      self.socket = null;
      self._stopPinging();
      self._closed(event);
    };
    socket.onerror = function () {
      // A close event follows, and decides what happens next.
    };
  };

  AgentStream.prototype._closed = function (event) {
    if (this.stopped) return;
    if (STOP_CODES.indexOf(event.code) !== -1) {
      this.stopped = true;
      this._setStatus("stopped", { code: event.code, reason: event.reason || "" });
      return;
    }
    this._reconnect(event);
  };

  AgentStream.prototype._reconnect = function (event) {
    var self = this;
    if (this.openedAt && Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
    this.openedAt = 0;
    var delay;
    if (this.resumeNow) {
      this.resumeNow = false;
      delay = 0;
    } else {
      var ceiling = Math.min(this.maxDelay, this.initialDelay * Math.pow(2, this.attempt));
      // Half fixed, half random: many clients closed together do not return together.
      delay = Math.round(ceiling / 2 + (this.random() * ceiling) / 2);
      this.attempt += 1;
      if (event.code === TRY_AGAIN_LATER) delay = Math.max(delay, Math.min(2000, this.maxDelay));
    }
    this.stats.reconnects += 1;
    this._setStatus("reconnecting", { code: event.code, reason: event.reason || "", delay: delay });
    clearTimeout(this.timer);
    this.timer = setTimeout(function () {
      if (!self.stopped) self._connect();
    }, delay);
  };

  AgentStream.prototype._startPinging = function () {
    var self = this;
    this._stopPinging();
    if (this.pingInterval > 0) {
      this.pinger = setInterval(function () {
        self.send({ action: "ping" });
      }, this.pingInterval);
    }
  };

  AgentStream.prototype._stopPinging = function () {
    clearInterval(this.pinger);
    this.pinger = null;
  };

  // Frames ----------------------------------------------------------------------------

  AgentStream.prototype._receive = function (text) {
    var frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      this.stats.errors += 1;
      return;
    }
    if (!frame || typeof frame !== "object") return;
    this.stats.frames += 1;
    if (this.onFrame) this.onFrame(frame, this);
    var changes = { changed: new Set(), removed: new Set() };
    var type = frame.type;
    if (UPDATE_TYPES[type]) {
      if (this._isNew(frame.seq)) this._apply(frame, changes, isSeq(frame.seq) ? frame.seq : null);
    } else if (type === "conflated") {
      this._conflated(frame, changes);
    } else if (type === "snapshot") {
      this._snapshot(frame);
    } else if (type === "ready") {
      this._ready(frame);
    } else if (type === "resync") {
      this._setStatus("resyncing", { reason: frame.reason || "" });
      this.requestSnapshot();
    } else if (type === "overflow") {
      this._overflow(frame);
    } else if (type === "error") {
      this._error(frame);
    }
    if (changes.changed.size || changes.removed.size) {
      if (this.status !== "live" && this.status !== "resyncing") this._setStatus("live");
      this._notify({
        kind: "changes",
        changed: Array.from(changes.changed),
        removed: Array.from(changes.removed),
        agents: this.agents,
        stream: this,
      });
    }
  };

  /** Whether a frame with this seq is new (and if so, it becomes the last seq). */
  AgentStream.prototype._isNew = function (seq) {
    if (!isSeq(seq)) return true;
    if (this.lastSeq !== null && seq <= this.lastSeq) {
      this.stats.duplicates += 1;
      return false;
    }
    this.lastSeq = seq;
    return true;
  };

  AgentStream.prototype._apply = function (message, changes, seq) {
    var id = message && message.agent_id;
    if (typeof id !== "string") return;
    if (message.type === "agent.deleted") {
      this.agents.delete(id);
      this.appliedSeq.delete(id);
      this._bury(id, seq);
      changes.changed.delete(id);
      changes.removed.add(id);
      this.stats.applied += 1;
      return;
    }
    var data = message.data || {};
    var held = this.agents.get(id);
    if (held && isSeq(held.version) && isSeq(data.version) && data.version < held.version) {
      this.stats.stale += 1;
      return;
    }
    this.tombstones.delete(id);
    this.agents.set(id, data);
    this.appliedSeq.set(id, seq);
    changes.removed.delete(id);
    changes.changed.add(id);
    this.stats.applied += 1;
  };

  AgentStream.prototype._bury = function (id, seq) {
    this.tombstones.delete(id);
    this.tombstones.set(id, seq);
    if (this.tombstones.size > MAX_TOMBSTONES) {
      this.tombstones.delete(this.tombstones.keys().next().value);
    }
  };

  AgentStream.prototype._conflated = function (frame, changes) {
    var seq = isSeq(frame.seq) ? frame.seq : null;
    if (seq !== null && this.lastSeq !== null && seq <= this.lastSeq) {
      this.stats.duplicates += 1;
      return;
    }
    var messages = Array.isArray(frame.messages) ? frame.messages : [];
    for (var i = 0; i < messages.length; i++) {
      var message = messages[i];
      if (message && UPDATE_TYPES[message.type]) {
        this._apply(message, changes, isSeq(message.seq) ? message.seq : seq);
      }
    }
    if (seq !== null) this.lastSeq = seq;
  };

  AgentStream.prototype._snapshot = function (frame) {
    if (isSeq(frame.id) && isSeq(this.pendingSnapshot) && frame.id < this.pendingSnapshot) {
      return; // an earlier request's answer; the latest one is on its way
    }
    var seq = isSeq(frame.seq) ? frame.seq : null;
    var agents = new Map();
    var applied = new Map();
    var self = this;
    (Array.isArray(frame.agents) ? frame.agents : []).forEach(function (item) {
      if (!item || typeof item.agent_id !== "string") return;
      var buried = self.tombstones.get(item.agent_id);
      // Deleted by a frame after the snapshot's point: it stays deleted.
      if (seq !== null && isSeq(buried) && buried > seq) return;
      var data = item.data || {};
      var mine = self.agents.get(item.agent_id);
      if (mine && isSeq(mine.version) && isSeq(data.version) && mine.version > data.version) {
        // Per agent the highest version wins, a snapshot's too.
        agents.set(item.agent_id, mine);
        applied.set(item.agent_id, self.appliedSeq.get(item.agent_id));
        return;
      }
      agents.set(item.agent_id, data);
      applied.set(item.agent_id, seq);
    });
    // Frames applied after the snapshot's point are newer than it: they stay.
    if (seq !== null) {
      this.agents.forEach(function (data, id) {
        var at = self.appliedSeq.get(id);
        if (!isSeq(at) || at <= seq) return;
        var taken = agents.get(id);
        if (!taken || !(isSeq(taken.version) && isSeq(data.version) && taken.version > data.version)) {
          agents.set(id, data);
          applied.set(id, at);
        }
      });
      this.tombstones.forEach(function (at, id) {
        if (!isSeq(at) || at <= seq) self.tombstones.delete(id);
      });
      this.lastSeq = this.lastSeq === null ? seq : Math.max(this.lastSeq, seq);
    }
    this.agents = agents;
    this.appliedSeq = applied;
    this.haveSnapshot = true;
    this.pendingSnapshot = null;
    this.stats.snapshots += 1;
    this._setStatus("live");
    this._notify({ kind: "reset", agents: this.agents, stream: this });
  };

  AgentStream.prototype._ready = function (frame) {
    // Live from after seq; on a resumed connection, everything up to it was replayed
    // first (the server says resync instead when it cannot).
    if (isSeq(frame.seq) && (this.lastSeq === null || frame.seq > this.lastSeq)) {
      this.lastSeq = frame.seq;
    }
    this._setStatus("live");
  };

  AgentStream.prototype._overflow = function (frame) {
    this.stats.overflows += 1;
    if (this.lastSeq !== null && this.socket) {
      // Resume fetches exactly what the server dropped.
      this.resumeNow = true;
      this.socket.close(CLOSE_RESUME, "overflow: resuming");
    } else {
      // No seq to resume from (a server before sequence numbers): start over.
      this.requestSnapshot();
    }
  };

  AgentStream.prototype._error = function (frame) {
    this.stats.errors += 1;
    if (isSeq(frame.id) && frame.id === this.pendingSnapshot) {
      // A server without snapshots: the page's own agents and the updates must do.
      this.pendingSnapshot = null;
      this.snapshotSupported = false;
      this._setStatus("live");
    }
    if (this.onError) this.onError(frame, this);
  };

  AgentStream.prototype._setStatus = function (status, detail) {
    this.status = status;
    try {
      this.onStatus(status, detail || {}, this);
    } catch (e) {
      if (root.console) root.console.error(e);
    }
  };

  AgentStream.prototype._notify = function (change) {
    try {
      this.onState(change, this);
    } catch (e) {
      if (root.console) root.console.error(e);
    }
  };

  AgentStream.socketUrl = socketUrl;
  AgentStream.STOP_CODES = STOP_CODES.slice();

  root.AgentStream = AgentStream;
  if (typeof module !== "undefined" && module.exports) module.exports = AgentStream;
})(typeof window !== "undefined" ? window : globalThis);
