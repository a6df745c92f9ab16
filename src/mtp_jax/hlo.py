"""Reading a compiled program's HLO text (`jit(f).lower(...).compile().as_text()`): what one
device runs, after partitioning, so each shape is one device's. `parse` splits the text into
computations; `walk` sums a measure of each instruction over one call of the program, through
fusions and calls, a while loop's body times its trip count, a conditional's costliest branch;
`recomputed` names the work XLA's own rematerialisation repeats to fit memory. model/flops.py
measures the matmuls with it; `collectives` below measures what each device sends to the others,
`host_transfers` what it moves to and from its host's memory, and `kernel_traffic` what its
kernels read from and write to its own.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Callable

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_ARRAY = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_ARRAYS = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([^\s,(){}]+)")
_CALLEES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_REMAT = re.compile(r"^(.+)\.remat\d*$")  # XLA's rematerialisation names its clones x.remat, x.remat2, ...


class Instruction(collections.namedtuple("Instruction", "name shape opcode rest")):
  """`%name = shape opcode(rest`: rest is the operands and attributes after the parenthesis."""


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, list[Instruction]]
  shapes: dict[str, str]  # every instruction's result shape, by name (names are unique in a module)
  entry: str | None
  partitions: int  # devices the program is partitioned over


def parse(text: str) -> Module:
  computations: dict[str, list[Instruction]] = {}
  shapes: dict[str, str] = {}
  entry, current = None, None
  for line in text.splitlines():
    if m := _HEADER.match(line):
      current = computations.setdefault(m[1], [])
      if line.startswith("ENTRY"):
        entry = m[1]
    elif current is not None and (m := _INSTRUCTION.match(line)):
      shape, rest = split_shape(m[2])
      opcode, _, rest = rest.partition("(")
      current.append(Instruction(m[1], shape, opcode, rest))
      shapes[m[1]] = shape
  partitions = re.search(r"\bnum_partitions=(\d+)", text.partition("\n")[0])
  return Module(computations, shapes, entry, int(partitions[1]) if partitions else 1)


Measure = Callable[[Instruction, Module], "collections.Counter | None"]


def walk(module: Module, measure: Measure, within: frozenset[str] | None = None) -> tuple[collections.Counter, int]:
  """(the sum of `measure` over one call of the entry computation, the while loops that hold a
  measured instruction but have no known trip count, each counted as running once). With
  `within`, only what these instructions run counts: their own measure and their callees'."""
  unknown = [0]

  @functools.cache
  def total(name: str, inside: bool) -> collections.Counter:
    sums = collections.Counter()
    for ins in module.computations.get(name, []):
      counts = inside or within is None or ins.name in within
      if counts and (own := measure(ins, module)):
        sums.update(own)
      if ins.opcode.endswith(("-done", "-update")):  # an async computation runs once, under its start
        continue
      called = _callees(ins.rest)
      if ins.opcode == "while":
        body = total(re.search(r"\bbody=%([^\s,(){}]+)", ins.rest)[1], counts)
        condition = module.computations.get(re.search(r"\bcondition=%([^\s,(){}]+)", ins.rest)[1])
        trip = int(m[1]) if (m := _TRIP.search(ins.rest)) else counted_to(condition)
        unknown[0] += trip is None and bool(body)
        sums.update(times(body, trip or 1))
      elif ins.opcode == "conditional":
        sums.update(max((total(c, counts) for c in called), key=lambda c: sum(c.values()), default={}))
      else:
        for c in called:
          sums.update(total(c, counts))
    return sums

  sums = total(module.entry, False) if module.entry else collections.Counter()
  return sums, unknown[0]


def recomputed(module: Module) -> frozenset[str]:
  """The instructions by which XLA's own rematerialisation (which XLA:TPU and XLA:GPU run when a
  program would not fit the device's memory, over and above JAX's) computes a value again: of an
  instruction and its clones x.remat, x.remat2, ..., all but the first in the text. Where the
  original is gone, the pass moved the work rather than repeated it, so its first clone is not
  counted (the clones' computations, `.clone` copies of the original's, count under them)."""
  copies: dict[str, list[str]] = {}
  for body in module.computations.values():
    for ins in body:
      if m := _REMAT.match(ins.name):
        copies.setdefault(m[1], []).append(ins.name)
  return frozenset(
    name for base, clones in copies.items() for name in (clones if base in module.shapes else clones[1:])
  )


def times(counter: collections.Counter, n: float) -> collections.Counter:
  return collections.Counter({k: v * n for k, v in counter.items()})


def counted_to(condition: list[Instruction] | None) -> int | None:
  """The trip count of a loop whose condition is `counter < N`, N its one constant: JAX's scans
  count from 0 by 1 (XLA:TPU's compiled loops carry no `known_trip_count`). The compare must be
  the condition's result (its root, printed last): `counter < N and not done`, a decoding loop's,
  may end sooner, so its trip count is unknown."""
  constants = [
    int(m[1]) for ins in condition or () if ins.opcode == "constant" and (m := re.match(r"(-?\d+)\)", ins.rest))
  ]
  compare = [ins for ins in condition or () if ins.opcode == "compare"]
  if len(constants) != 1 or len(compare) != 1 or "direction=LT" not in compare[0].rest or compare[0] != condition[-1]:
    return None
  return constants[0]


def split_shape(text: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' -> ('f32[2,3]{1,0}', 'dot(...)'); a tuple shape in parentheses whole."""
  if not text.startswith("("):
    shape, _, rest = text.partition(" ")
    return shape, rest
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return text[: i + 1], text[i + 1 :].lstrip()
  return text, ""


def dims(shape: str) -> tuple[int, ...]:
  if shape.startswith("("):  # a tuple: its first array (a custom-call's result before its workspace)
    shape = shape[1:]
  m = _ARRAY.match(shape)
  return tuple(int(d) for d in m[1].split(",") if d) if m else ()


_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "c64": 64}
_BITS |= {"f32": 32, "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64, "c128": 128}


def nbytes(shape: str) -> float:
  """Bytes of every array in a shape, a tuple's summed (layouts and memory spaces ignored)."""
  total = 0.0
  for dtype, sizes in _ARRAYS.findall(shape.split("{")[0] if not shape.startswith("(") else shape):
    bits = _BITS.get(dtype, 8 if dtype.startswith("f8") else None)
    if bits:
      total += math.prod(int(d) for d in sizes.split(",") if d) * bits / 8
  return total


def attr(rest: str, key: str) -> list[int]:
  m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", rest)
  return [int(d) for d in m[1].split(",") if d] if m else []


def operands(rest: str) -> list[str]:
  head = re.sub(r"/\*.*?\*/", "", rest[: rest.find(")")] if ")" in rest else rest)  # /*index=5*/ marks
  return [op.strip().split(" ")[-1].lstrip("%") for op in head.split(",") if op.strip()]


# ---- What each device sends ------------------------------------------------------------------

# The collectives, by the name they are reported under. XLA:GPU and XLA:TPU split some into an
# asynchronous start and done (counted at the start: `all-gather-start`, `ragged-all-to-all-start`
# and the like, read as their kind) and wrap others in async-start computations (counted inside
# them).
_KINDS = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
  "collective-broadcast",
)


def kind_of(opcode: str) -> str | None:
  """The collective an opcode starts or is ('all-gather-start' -> 'all-gather'), else None."""
  stem = opcode.removesuffix("-start")
  return stem if stem in _KINDS else None


def group_size(rest: str, partitions: int) -> int:
  """Devices in each of a collective's groups, from its `replica_groups` in any of XLA's three
  spellings: {{0,1},{2,3}}, the iota form [groups,size]<=[...], or mesh[...] {'axis',...}."""
  m = re.search(r"\breplica_groups=(\{\{[^}]*\}|\[\d+,(\d+)\]<=|mesh\[([^\]]*)\] \{([^}]*)\}|\{\})", rest)
  if not m or m[1] == "{}":
    return partitions
  if m[2]:
    return int(m[2])
  if m[3] is not None:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m[3]))
    return math.prod(int(sizes.get(axis, 1)) for axis in re.findall(r"'([^']+)'", m[4]))
  return len([d for d in m[1].strip("{}").split(",") if d.strip()])


def sent_bytes(ins: Instruction, module: Module) -> tuple[str, float] | None:
  """(kind, bytes one device sends) for a collective, else None. The bytes are what a
  bandwidth-optimal algorithm sends from each device of a group of n: (n-1)/n of the gathered
  result (all-gather), of the input (reduce-scatter, all-to-all), twice that (all-reduce, a
  reduce-scatter then an all-gather); all of the input where any device sends to another
  (collective-permute). ragged-all-to-all counts its whole send buffer, a bound: the rows it
  sends depend on the routing."""
  kind = kind_of(ins.opcode)
  if kind is None:
    return None
  given = sum(nbytes(module.shapes.get(op, "")) for op in operands(ins.rest))
  if kind == "ragged-all-to-all":
    given = nbytes(module.shapes.get(operands(ins.rest)[0], ""))
  result = nbytes(ins.shape)
  if ins.opcode.endswith("-start"):  # its result holds its operands, then its outputs (and scalar contexts)
    result -= given
  if kind == "collective-permute":
    pairs = re.findall(r"\{(\d+),(\d+)\}", ins.rest.partition("source_target_pairs=")[2].partition("}}")[0] + "}")
    return kind, given if any(a != b for a, b in pairs) else 0.0
  n = group_size(ins.rest, module.partitions)
  share = (n - 1) / n if n > 1 else 0.0
  moved = {"all-gather": result, "all-reduce": 2 * given, "reduce-scatter": given}.get(kind, given)
  return kind, moved * share


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  shape: str  # one call's result, without its layout
  op: str  # the JAX operation it comes from (XLA's op_name, shortened)
  sent: float  # bytes one device sends per step, every call
  calls: float  # per step


@dataclasses.dataclass(frozen=True)
class Collectives:
  """What one device sends to others in one call of a program, by collective."""

  each: list[Collective]  # the largest first
  unread: dict[str, float] = dataclasses.field(default_factory=dict)  # unknown collective opcode -> calls a step
  loops_once: int = 0  # loops holding collectives with no trip count found, each counted as running once
  recomputed: float = 0.0  # bytes of `each` sent again by XLA's own rematerialisation (`recomputed`)

  def by_kind(self) -> dict[str, tuple[float, float]]:
    """kind -> (bytes sent, calls), the most bytes first."""
    sums: dict[str, list[float]] = {}
    for c in self.each:
      s = sums.setdefault(c.kind, [0.0, 0.0])
      s[0] += c.sent
      s[1] += c.calls
    return {k: (v[0], v[1]) for k, v in sorted(sums.items(), key=lambda kv: -kv[1][0])}

  @property
  def sent(self) -> float:
    return sum(c.sent for c in self.each)


def result_shape(ins: Instruction) -> str:
  """A collective's result without layouts: of a start's tuple, what follows its operands, less
  the scalar contexts after it. A combined collective (XLA merges many gradients' all-reduces
  into one) is summed up by its count and largest array."""
  arrays = [f"{t}[{d}]" for t, d in _ARRAYS.findall(ins.shape)]
  if ins.opcode.endswith("-start"):
    arrays = arrays[len(operands(ins.rest)) :]
    while len(arrays) > 1 and arrays[-1].endswith("[]"):
      arrays.pop()
  if len(arrays) == 1:
    return arrays[0]
  if len(arrays) <= 3:
    return f"({', '.join(arrays)})"
  return f"{len(arrays)} arrays (the largest {max(arrays, key=nbytes)})"


def short_op(op_name: str) -> str:
  """'jit(train_step)/jvp()/while/body/closed_call/bld,dhk->blhk/dot_general' ->
  'jvp()/bld,dhk->blhk/dot_general': the jit and the loop plumbing left out; a fused or combined
  instruction's '(a:b:c)' as its first two distinct names and how many more."""
  if op_name.startswith("jit(") and "/" in op_name:
    op_name = op_name.partition("/")[2]
  parts = re.split(r"/(?![^(]*\))", op_name)  # slashes outside parentheses
  kept = "/".join(p for p in parts if p not in ("while", "body", "closed_call", "cond", "branch"))
  group = _group(kept)
  if group is not None:
    prefix, names = group
    names = list(dict.fromkeys(short_op(prefix + n) for n in names))
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    kept = ", ".join(names[:2]) + more
  return kept


def _group(name: str) -> tuple[str, list[str]] | None:
  """'a/(b:c/d)' -> ('a/', ['b', 'c/d']): the names XLA joined with ':' in a fused or combined
  instruction's op_name, with the path before them; None for a single name."""
  if not name.endswith(")") or ":" not in name:
    return None
  depth = 0
  for i in range(len(name) - 1, -1, -1):
    depth += {")": 1, "(": -1}.get(name[i], 0)
    if depth == 0:
      break
  prefix, inner = name[:i], name[i + 1 : -1]
  if (prefix and not prefix.endswith("/")) or ":" not in inner:
    return None
  return prefix, inner.split(":")


def _between_slices(ins: Instruction, module: Module) -> collections.Counter:
  """What a chip hands XLA:TPU's runtime for DCN (megascale) to move between slices: a `send`,
  named by the collective it serves (`_xla_megascale_transfer_type`), its whole buffer counted
  once. How many times the runtime puts it on the wire, the program does not say."""
  kind = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', ins.rest)
  buffer = module.shapes.get(operands(ins.rest)[0], "")
  shape = next((f"{t}[{d}]" for t, d in _ARRAYS.findall(buffer)), buffer)
  key = ("dcn " + (kind[1].lower().replace("_", "-") if kind else "send"), shape, "")
  return collections.Counter({("sent", key): nbytes(buffer), ("calls", key): 1})


def _fused_scatters(module: Module) -> dict[str, str]:
  """XLA:TPU's reduce-scatters as it prints them: an `all-reduce` of the (padded) gradient inside
  a fusion computation named `all-reduce-scatter...` (kind=kCustom), whose root is the device's
  dynamic slice of the sum. The fused collective returns only that slice, so it is read as the
  reduce-scatter it implements (the first phase of the all-reduce, half its bytes), not as a
  whole all-reduce. {all-reduce name: the fusion's result shape}."""
  fused = {}
  for name, body in module.computations.items():
    if name.startswith("all-reduce-scatter") and body:
      fused |= {ins.name: result_shape(body[-1]) for ins in body if kind_of(ins.opcode) == "all-reduce"}
  return fused


def collectives(text: str) -> Collectives:
  """The collectives by which one device sends data to others per call of a compiled program,
  loops counted out."""
  module = parse(text)
  scatters = _fused_scatters(module)

  def measure(ins: Instruction, module: Module) -> collections.Counter | None:
    if ins.opcode == "send" and "xla_megascale_runtime" in ins.rest:
      return _between_slices(ins, module)
    sent = sent_bytes(ins, module)
    if sent is not None and ins.name in scatters:  # half an all-reduce's bytes: the reduce-scatter's
      sent = ("reduce-scatter", sent[1] / 2)
    if sent is None:
      # A kind's name inside an opcode that is none of them: a collective this reader does not know.
      unknown = any(k in ins.opcode for k in _KINDS) and not ins.opcode.endswith(("-done", "-update"))
      return collections.Counter({("unread", ins.opcode): 1}) if unknown else None
    op = re.search(r'op_name="([^"]*)"', ins.rest)
    key = (sent[0], scatters.get(ins.name) or result_shape(ins), short_op(op[1]) if op else "")
    return collections.Counter({("sent", key): sent[1], ("calls", key): 1})

  sums, loops_once = walk(module, measure)
  again, _ = walk(module, measure, within=recomputed(module))
  # Groups of one device (XLA leaves some on a single device) send nothing and are left out.
  each = [
    Collective(*key, sent=v, calls=sums[("calls", key)]) for (what, key), v in sums.items() if what == "sent" and v
  ]
  unread = {opcode: n for (what, opcode), n in sums.items() if what == "unread"}
  resent = sum(v for (what, _), v in again.items() if what == "sent")
  return Collectives(sorted(each, key=lambda c: -c.sent), unread, loops_once, resent)


# ---- What each device moves to and from its host's memory -------------------------------------

_LAYOUT = re.compile(r"^\(*[a-z0-9]+\[[0-9,]*\](\{[^}]*\})?")


def _on_host(shape: str) -> bool:
  """Whether an array (a tuple's first) lives in the host's memory: memory space 5 in its layout,
  where XLA puts what `train.remat_offload` sends there."""
  m = _LAYOUT.match(shape)
  return bool(m and m[1] and "S(5)" in m[1])


# The instructions that can move data between a device's memory and its host's.
_MOVES = {
  "dynamic-update-slice",
  "dynamic-update-slice-start",
  "dynamic-slice",
  "dynamic-slice-start",
  "copy",
  "copy-start",
}


def host_transfers(text: str) -> tuple[float, float]:
  """(bytes to the host's memory, bytes back from it) per call of a compiled program, loops
  counted out: what offloaded values cost the link between a device and its host. A
  dynamic-update-slice into a host buffer writes its update there, a dynamic-slice of one reads
  its slice back, and a copy from one memory to the other moves its operand. XLA:TPU runs the
  slices asynchronously: `compiled.as_text()` prints them as dynamic-slice-start and the like,
  its dump files as async-start calling a computation that holds the slice; both count once."""
  module = parse(text)

  def measure(ins: Instruction, module: Module) -> collections.Counter | None:
    if ins.opcode not in _MOVES:
      return None
    args = [module.shapes.get(op, "") for op in operands(ins.rest)]
    if not args:
      return None
    if ins.opcode in ("dynamic-update-slice", "dynamic-update-slice-start") and len(args) > 1:
      if _on_host(args[0]) and not _on_host(args[1]):
        return collections.Counter(to=nbytes(args[1]))
    elif ins.opcode in ("dynamic-slice", "dynamic-slice-start") and _on_host(args[0]):
      element = nbytes(args[0]) / max(math.prod(dims(args[0])), 1)
      return collections.Counter(back=element * math.prod(attr(ins.rest, "dynamic_slice_sizes")))
    elif ins.opcode in ("copy", "copy-start") and _on_host(args[0]) != _on_host(ins.shape):
      return collections.Counter({"back" if _on_host(args[0]) else "to": nbytes(args[0])})
    return None

  sums, _ = walk(module, measure)
  return sums["to"], sums["back"]


# ---- What each device reads from and writes to its memory -------------------------------------

# Instructions that launch no kernel of their own: they name, regroup or reinterpret buffers, or
# run others (loops and calls are walked into), or finish what a start began.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "conditional",
  "call",
  "after-all",
  "add-dependency",
  "opt-barrier",
  "partition-id",
  "replica-id",
  "domain",
}
# Ops through which a fused parameter is read only in part: the result's bytes are what is read.
_PARTIAL_READS = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass(frozen=True)
class Traffic:
  """What one device's kernels move to and from its memory per call of a program."""

  bytes: float
  loops_once: int  # loops holding kernels with no trip count found, each counted as running once
  largest: list[tuple[str, str, float]]  # (kernel, the JAX operation it runs, its bytes a call), the most first


def kernel_traffic(text: str, largest: int = 3, within: frozenset[str] | None = None) -> Traffic:
  """What one device's kernels read from and write to its memory per call of a compiled
  program, loops counted out, by the rule XLA's own cost model has for a kernel (a fusion, a
  library call, an op left unfused): it reads its operands and writes its result, once each. A
  fused parameter read only through slices counts the slices; a fusion that updates its operand
  in place (its root a dynamic-update-slice of a parameter) counts the update written, not the
  buffer. Caches are ignored: an operand that several kernels read counts for each. XLA:GPU gives
  no byte count for a program compiled with no GPU attached; this is the one a roofline of its
  step can use there. `largest`: how many of the busiest kernels to name. `within`: only what
  these instructions run (see `walk`), such as one loop of the program."""
  module = parse(text)
  inner = {  # instructions of the computations that kernels run inside them (fusion bodies and the like)
    ins.name
    for body in module.computations.values()
    for kernel in body
    if kernel.opcode not in _FREE
    for c in _callees(kernel.rest)
    for ins in module.computations.get(c, [])
  }

  def measure(ins: Instruction, module: Module) -> collections.Counter | None:
    if ins.opcode in _FREE or ins.opcode.endswith(("-done", "-update")) or ins.name in inner:
      return None
    args = [module.shapes.get(op, "") for op in operands(ins.rest)]
    if ins.opcode in ("fusion", "fusion-start") and (m := _CALLEE.search(ins.rest)):
      moved = _fused_traffic(module, module.computations.get(m[1], []), args)
    elif ins.opcode == "dynamic-update-slice" and len(args) > 1:  # in place: the update, read and written
      moved = 2 * nbytes(args[1])
    elif ins.opcode in _PARTIAL_READS:
      moved = 2 * nbytes(ins.shape)
    else:
      read, written = sum(map(nbytes, args)), nbytes(ins.shape)
      if ins.opcode.endswith("-start"):  # an async start's result holds its operands, then its outputs
        written = max(written - read, 0.0)
      moved = read + written
    return collections.Counter({ins.name: moved})

  by_kernel, loops_once = walk(module, measure, within)
  ops = {ins.name: ins.rest for body in module.computations.values() for ins in body}

  def op_of(name: str) -> str:
    m = re.search(r'op_name="([^"]*)"', ops.get(name, ""))
    return short_op(m[1]) if m else ""

  busiest = [(name, op_of(name), moved) for name, moved in by_kernel.most_common(largest)]
  return Traffic(sum(by_kernel.values()), loops_once, busiest)


def _callees(rest: str) -> list[str]:
  """The computations an instruction calls: a fusion's body, a loop's, a reduction's and the like."""
  listed = [c.strip().lstrip("%") for group in _CALLEES.findall(rest) for c in group.split(",") if c.strip()]
  return _CALLEE.findall(rest) + listed


def _fused_traffic(module: Module, body: list[Instruction], args: list[str]) -> float:
  """Bytes a fusion of `body` called with operands of shapes `args` reads and writes (its root
  is the last instruction, as XLA prints it)."""
  if not body:
    return sum(map(nbytes, args))
  by_name = {ins.name: ins for ins in body}
  roots = [body[-1]]
  if roots[0].opcode == "tuple":
    roots = [by_name[op] for op in operands(roots[0].rest) if op in by_name]
  written, in_place = 0.0, set()
  for root in roots:
    buffer, *update = operands(root.rest) or [""]
    if root.opcode == "dynamic-update-slice" and by_name.get(buffer, root).opcode == "parameter" and update:
      in_place.add(buffer)
      written += nbytes(by_name[update[0]].shape) if update[0] in by_name else 0.0
    else:
      written += nbytes(root.shape)
  read = 0.0
  for ins in body:
    if (index := _parameter_index(ins)) is not None and index < len(args):
      part = _read_of(module, body, ins.name, skip=roots if ins.name in in_place else ())
      read += nbytes(args[index]) if part is None else part
  return read + written


def _read_of(module: Module, body: list[Instruction], name: str, skip=()) -> float | None:
  """Bytes of a fused value that the fusion's instructions read, where they read it only in
  part: through slices, bitcasts and fusions nested inside (None: some read it whole)."""
  read = 0.0
  for user in body:
    args = operands(user.rest)
    if name not in args or user in skip:
      continue
    if user.opcode in _PARTIAL_READS and args[0] == name:
      read += nbytes(user.shape)
    elif user.opcode == "bitcast":
      part = _read_of(module, body, user.name)
      if part is None:
        return None
      read += part
    elif user.opcode == "fusion" and (m := _CALLEE.search(user.rest)):
      inner = module.computations.get(m[1], [])
      params = {index: ins.name for ins in inner if (index := _parameter_index(ins)) is not None}
      for index in (i for i, a in enumerate(args) if a == name):
        part = _read_of(module, inner, params[index]) if index in params else None
        if part is None:
          return None
        read += part
    else:
      return None
  return read


def _parameter_index(ins: Instruction) -> int | None:
  m = re.match(r"(\d+)\)", ins.rest) if ins.opcode == "parameter" else None
  return int(m[1]) if m else None
