"""The requantization unit: REQUANT's walk over the accumulators, its parameter read, the
``requant_lanes`` requantizers and the write of their results (to the activations, or
with ``to_acc`` back into the accumulators through the accumulate path), and the SETPP,
SETREQ and SETOUT registers it reads.

Timing (``sw/timing.py``; the cycle model's ``requant_free_at``): a REQUANT reads one
group of ``requant_lanes`` accumulators a cycle (with ``to_acc`` on an NPU without
``requant_overlap``, every other cycle; with a serial product, ``requant_serial_bits``,
one every ``requant_product_cycles`` P), the ``cols // requant_lanes`` groups of each
accumulator word in turn, from the cycle after its start. Each group then takes

- 1 cycle: the accumulator memory's read (the parameter read is a cycle later);
- ``REQUANT_INPUT_STAGES`` (1): the group is selected and registered, and the
  parameters arrive from their memory beside it;
- the lane's latency (``requant_lane_latency``: ``REQUANT_PIPELINE_STAGES`` with the
  product in DSP blocks, 6 + P serial, 14 + P past P = 9), whose output is written the
  cycle it leaves;

and ``active`` (which holds the sequencer) stays up until the last write, so the next
instruction dispatches ``requant_cycles(groups, P)`` cycles after the REQUANT's start
(``groups + REQUANT_TAIL_CYCLES`` with DSP products, ``groups·P + 10`` serial,
``groups·P + 18`` past P = 9).

With ``requant_overlap`` a REQUANT (but to_acc) dispatches while the feeder still streams
or its results drain: it then waits ``drain_wait`` cycles (the feeder's count, latched at
the dispatch) before it starts, as if dispatched then, and the MATMULs after it stream
meanwhile (``sw/timing.py``).

On NPUs with ``config.requant_from_map``, a REQUANT to_acc after a SETOUT with
``from_map`` reads activation words instead of accumulator words, along SETOUT's walk
from its ``acc_addr``, through the activations' read port (free: the feeder is idle while
a REQUANT to_acc runs), each lane sign-extended; the timing is the same.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH, Opcode
from ..layouts import param_lane_fields
from ..memory_map import Region, memories
from ..timing import REQUANT_INPUT_STAGES, array_latency
from .implementation import GENERIC, Implementation, check_implementation
from .instruction import instruction_field
from .out_walk import out_walk
from .ports import ReadRequest, WriteRequest
from .requant import Requantizer
from .to_acc import AccumulatorReturn, inject_members

__all__ = ["RequantUnit"]

# One input register before the lanes, the parameters read a cycle later to match.
if REQUANT_INPUT_STAGES != 1:
    raise ImportError("hw/requant_unit.py builds one requantizer input register; update it "
                      "with REQUANT_INPUT_STAGES")


def _field(word, name: str):
    return instruction_field(word, Opcode.REQUANT, name)


class RequantUnit(wiring.Component):
    """Runs the REQUANT held in ``instruction`` from the cycle ``dispatch`` is high.

    ``set_pp``, ``set_req`` and ``set_out`` load the SETPP, SETREQ and SETOUT held in
    ``instruction``; ``run_start`` restores SETOUT's defaults. ``abort`` stops the walk
    (the pipeline drains, its writes refused: they are gated by ``running``). ``active``
    is high from the cycle after the dispatch until the last result is written;
    ``overlap`` (NPUs generated with ``requant_overlap``) holds the last REQUANT's
    ``overlap`` bit, unless it went ``to_acc``. ``drain_wait`` (the feeder's) is how many
    cycles after the dispatch the REQUANT starts: 0 unless it dispatched beside a stream;
    ``drained`` says it is 0 (from the feeder's registers).

    With ``to_acc`` (feature-map builds), a whole result word is collected and sent with
    ``inject_read`` (its destination word is read) and, a cycle later, ``inject`` and
    ``inject_row`` (it joins the accumulate path).

    ``implementation``: whose DSP blocks the requantizers' products take (hw/dsp.py).
    """

    def __init__(self, config: NpuConfig, *, implementation: Implementation = GENERIC):
        self._config = check_config_type(config)
        self._implementation = check_implementation(implementation)
        infos = memories(config)
        acc, params = infos[Region.ACCUMULATORS], infos[Region.PARAMS]
        act = infos[Region.ACTIVATIONS]
        super().__init__({
            "instruction": In(INSTRUCTION_WIDTH),
            "dispatch": In(1),
            "set_pp": In(1),
            "set_req": In(1),
            "set_out": In(1),
            "run_start": In(1),
            "abort": In(1),
            "running": In(1),
            "drain_wait": In(range((1 << 16) + array_latency(config.array_rows,
                                                             config.skew_cols) + 3)),
            "drained": In(1, init=1),
            "active": Out(1),
            "overlap": Out(1),
            "acc_read": Out(ReadRequest(depth=acc.depth, data_width=acc.width)),
            "act_read": Out(ReadRequest(depth=act.depth, data_width=act.width)),
            "param_read": Out(ReadRequest(depth=params.depth, data_width=params.width)),
            "act_write": Out(WriteRequest(depth=act.depth, data_width=act.width,
                                          lanes=act.width // act.granularity)),
            **inject_members(config),
        })

    @property
    def config(self) -> NpuConfig:
        return self._config

    def elaborate(self, platform):
        c = self._config
        m = Module()
        rows, cols, lanes = c.rows, c.cols, c.requant_lanes
        groups = cols // lanes
        instruction = self.instruction

        settings = self._settings(m)
        param_addr, out_stride = settings["param_addr"], settings["out_stride"]
        from_map = settings["from_map"]
        # Where each accumulator word's results go: consecutive words, or with the
        # feature-map hardware SETOUT's rows.
        m.submodules.out_walk = walk = out_walk(c)

        # The walk: accumulator word, its group, and where the group's results go.
        rq_busy = Signal()
        rq_remaining = Signal(16)
        rq_group = Signal(range(groups))
        rq_acc_addr = Signal(range(c.accumulator_depth))
        rq_word = Signal(range(c.activation_depth))
        rq_lane = Signal(range(rows + 1))
        rq_first_lane = Signal(range(rows))
        rq_param_addr = Signal(range(c.param_depth))
        rq_left_shift = Signal()
        rq_single = Signal()   # REQUANT single_rounding (read with rounding "both" only)
        rq_even = Signal()     # REQUANT ties_to_even (read by builds with single rounding)
        rq_from_map = Signal()   # the source is an activation map (SETOUT from_map, to_acc)
        # REQUANT to_acc (feature-map hardware): the raw results go back into the
        # accumulators through the accumulate path; without requant_overlap the source
        # words are read every other cycle (hw/to_acc.py).
        if c.requant_to_acc:
            m.submodules.to_acc = to_acc = AccumulatorReturn(c)
            rq_to_acc, hold = to_acc.enabled, to_acc.hold
        else:
            to_acc, rq_to_acc, hold = None, Const(0), Const(0)
        # With a serial product the lanes take a group every product_cycles cycles.
        paced = Const(1)
        if c.requant_product_cycles > 1:
            pace = Signal(range(c.requant_product_cycles))
            paced = pace == 0
        rq_advance = Signal()
        m.d.comb += rq_advance.eq(rq_busy & ~hold & paced)
        if c.requant_product_cycles > 1:
            with m.If(rq_advance):
                m.d.sync += pace.eq(c.requant_product_cycles - 1)
            with m.Elif(~paced):
                m.d.sync += pace.eq(pace - 1)
        # The group in the input register and its place in the activations.
        stage_valid = Signal()
        stage_from_map = Signal()
        stage_group = Signal(range(groups))
        stage_word = Signal(range(c.activation_depth))
        stage_lane = Signal(range(rows))

        # The accumulator word is registered before the requantizer (REQUANT_INPUT_STAGES):
        # a block RAM's slow output then feeds only the group multiplexer and a register.
        # The parameters are read a cycle later instead, to arrive with it.
        param_next = Signal.like(rq_param_addr)
        param_next_valid = Signal()
        m.d.sync += param_next_valid.eq(rq_advance)
        m.d.comb += [self.param_read.valid.eq(param_next_valid),
                     self.param_read.addr.eq(param_next),
                     self.acc_read.valid.eq(rq_advance), self.acc_read.addr.eq(rq_acc_addr)]
        with m.If(rq_advance):
            m.d.sync += param_next.eq(rq_param_addr)
            last_group = rq_group == groups - 1
            next_lane = rq_lane + lanes
            m.d.sync += [
                stage_valid.eq(1), stage_from_map.eq(rq_from_map),
                stage_group.eq(rq_group), stage_word.eq(rq_word),
                stage_lane.eq(rq_lane), rq_group.eq(rq_group + 1),
                rq_param_addr.eq(rq_param_addr + 1),
            ]
            with m.If(next_lane == rows):
                m.d.sync += [rq_lane.eq(0), rq_word.eq(rq_word + out_stride)]
            with m.Else():
                m.d.sync += rq_lane.eq(next_lane)
            with m.If(last_group):
                m.d.sync += [
                    rq_group.eq(0), rq_lane.eq(rq_first_lane),
                    rq_acc_addr.eq(rq_acc_addr + 1), rq_remaining.eq(rq_remaining - 1),
                ]
                # The next word's parameters: the same groups', or with SETREQ's
                # param_walk the next ones (the address counts on).
                with m.If(~settings["param_walk"]):
                    m.d.sync += rq_param_addr.eq(param_addr)
                m.d.sync += rq_word.eq(walk.next_addr)
                with m.If(rq_remaining == 1):
                    m.d.sync += rq_busy.eq(0)
        with m.Else():
            m.d.sync += stage_valid.eq(0)
        # The walk's registers load while the unit is idle, when nothing reads them, rather
        # than on the REQUANT's dispatch: the dispatch decision ends the sequencer's longest
        # path, and only rq_busy (and the fields the draining pipeline still reads) need it.
        out_addr = _field(instruction, "out_addr")
        first_lane = _field(instruction, "out_lane")
        # With SETOUT's from_map a REQUANT to_acc walks the activations from acc_addr
        # (its source map) instead of the output's words: rq_word is then the source.
        reads_map = Signal()
        walk_start = Signal(16)
        if c.requant_from_map:
            m.d.comb += reads_map.eq(from_map & _field(instruction, "to_acc"))
        m.d.comb += walk_start.eq(Mux(reads_map, _field(instruction, "acc_addr"), out_addr))
        m.d.comb += [self.act_read.valid.eq(rq_advance & rq_from_map),
                     self.act_read.addr.eq(rq_word)]
        # A REQUANT dispatched beside the feeder's stream waits (rq_wait counts down from
        # drain_wait) until the stream's results are written, and starts as if dispatched
        # in the cycle rq_wait is 1. Its fields were latched in the dispatch cycle; the
        # instruction register has moved on since.
        # From registers only, as the dispatch decision ends the sequencer's longest path:
        # ``drained`` (the feeder idle and drain_idle) says drain_wait is 0, and
        # ``rq_wait_last`` that rq_wait is 1.
        # Only NPUs with requant_overlap dispatch a REQUANT beside the feeder.
        rq_pending = Signal() if c.requant_overlap else Const(0)
        start = Signal()
        if c.requant_overlap:
            rq_wait = Signal.like(self.drain_wait)
            rq_wait_last = Signal()
            m.d.comb += start.eq((self.dispatch & self.drained)
                                 | (rq_pending & rq_wait_last))
            with m.If(self.dispatch):
                m.d.sync += [rq_wait.eq(self.drain_wait), rq_pending.eq(~self.drained),
                             rq_wait_last.eq(self.drain_wait == 1)]
            with m.Elif(rq_pending):
                m.d.sync += [rq_wait.eq(rq_wait - 1), rq_wait_last.eq(rq_wait == 2)]
                with m.If(rq_wait_last):
                    m.d.sync += rq_pending.eq(0)
        else:
            m.d.comb += start.eq(self.dispatch)
        with m.If(~rq_busy & ~rq_pending):
            m.d.sync += [
                rq_group.eq(0), rq_param_addr.eq(param_addr),
                rq_remaining.eq(_field(instruction, "count")),
                rq_acc_addr.eq(_field(instruction, "acc_addr")),
                rq_word.eq(walk_start), rq_lane.eq(first_lane), rq_first_lane.eq(first_lane),
                rq_from_map.eq(reads_map),
            ]
        m.d.comb += [
            walk.load.eq(~rq_busy & ~rq_pending), walk.start_addr.eq(walk_start),
            walk.step.eq(rq_advance & (rq_group == groups - 1)),
            walk.instruction.eq(instruction), walk.set_out.eq(self.set_out),
            walk.run_start.eq(self.run_start),
        ]
        with m.If(start):
            m.d.sync += rq_busy.eq(1)
        with m.If(self.dispatch):
            if c.requant_overlap:
                m.d.sync += self.overlap.eq(_field(instruction, "overlap")
                                            & ~_field(instruction, "to_acc"))
            if c.rounding == "both":
                m.d.sync += rq_single.eq(_field(instruction, "single_rounding"))
            if c.rounding != "double":
                m.d.sync += rq_even.eq(_field(instruction, "ties_to_even"))
            if c.requant_to_acc:
                m.d.sync += rq_left_shift.eq(_field(instruction, "left_shift"))

        requantizers = self._lanes(m, settings, stage_valid, stage_from_map, stage_group,
                                   rq_left_shift, rq_single, rq_even)

        # Each group's place in the activations, from the input register to the write.
        out_valid, out_word, out_lane, in_flight = self._places(
            m, requantizers[0], stage_valid, stage_word, stage_lane)
        # rq_busy | stage_valid | the groups in the lanes, kept in a register (set from the
        # values these take next) so that the OR does not lengthen the dispatch decision.
        # Next cycle: rq_busy unless aborted (while finishing, the last advance keeps
        # stage_valid up), stage_valid after an advance, a group still to be written.
        rq_active = Signal()
        m.d.sync += rq_active.eq((~self.abort & (self.dispatch | rq_busy | rq_pending))
                                 | rq_advance | stage_valid | in_flight)
        self._write_back(m, requantizers, out_valid, out_word, out_lane, rq_to_acc)
        if to_acc is not None:
            m.d.comb += [
                to_acc.dispatch.eq(self.dispatch),
                to_acc.to_acc.eq(_field(instruction, "to_acc")),
                to_acc.accumulate.eq(_field(instruction, "accumulate")),
                to_acc.dest.eq(out_addr), to_acc.busy.eq(rq_busy),
                to_acc.running.eq(self.running), to_acc.out_valid.eq(out_valid),
                to_acc.raw.eq(Cat(*[rq.raw for rq in requantizers])),
                self.inject_read.eq(to_acc.inject_read), self.inject.eq(to_acc.inject),
                self.inject_row.eq(to_acc.inject_row),
            ]

        with m.If(self.abort):
            m.d.sync += rq_busy.eq(0)
            if c.requant_overlap:
                m.d.sync += rq_pending.eq(0)
        m.d.comb += self.active.eq(rq_active | to_acc.active if to_acc is not None
                                   else rq_active)
        return m

    def _places(self, m, lane, stage_valid, stage_word, stage_lane):
        """Each group's output word and lane, from the input register (``stage_*``) to the
        cycle ``lane`` (the first requantizer) puts out its results: ``out_valid``,
        ``out_word``, ``out_lane``, and whether a group is still to be written after this
        cycle. A group a cycle: a shift register as long as the pipeline. With a serial
        product, a few groups are in the lanes at once: a small queue of them."""
        c = self._config
        rows = c.rows
        stages = REQUANT_INPUT_STAGES + lane.latency
        if c.requant_product_cycles == 1:
            pipe = [(Signal(name=f"rq_valid_p{i}"),
                     Signal(range(c.activation_depth), name=f"rq_word_p{i}"),
                     Signal(range(rows), name=f"rq_lane_p{i}")) for i in range(stages)]
            previous = (stage_valid, stage_word, stage_lane)
            for registers in pipe:
                m.d.sync += [r.eq(v) for r, v in zip(registers, previous, strict=True)]
                previous = registers
            return (*previous, Cat(*[valid for valid, _, _ in pipe[:-1]]).any())
        # Groups enter every product_cycles cycles or more, and each leaves `stages` cycles
        # after it enters.
        depth = stages // c.requant_product_cycles + 1
        words = [Signal(range(c.activation_depth), name=f"rq_word_q{i}") for i in range(depth)]
        lanes = [Signal(range(rows), name=f"rq_lane_q{i}") for i in range(depth)]
        head, tail = Signal(range(depth)), Signal(range(depth))
        count = Signal(range(depth + 1))
        out_valid = lane.out_valid

        def advance(pointer):
            return Mux(pointer == depth - 1, 0, pointer + 1)

        with m.If(stage_valid):
            m.d.sync += tail.eq(advance(tail))
            for i in range(depth):
                with m.If(tail == i):
                    m.d.sync += [words[i].eq(stage_word), lanes[i].eq(stage_lane)]
        with m.If(out_valid):
            m.d.sync += head.eq(advance(head))
        m.d.sync += count.eq(count + stage_valid - out_valid)
        out_word = Signal.like(stage_word)
        out_lane = Signal.like(stage_lane)
        with m.Switch(head):
            for i in range(depth):
                with m.Case(i):
                    m.d.comb += [out_word.eq(words[i]), out_lane.eq(lanes[i])]
        in_flight = (count > 1) | ((count == 1) & ~out_valid)
        return out_valid, out_word, out_lane, in_flight

    def _settings(self, m) -> dict:
        """The SETPP and SETREQ registers and SETOUT's from_map, by name."""
        c = self._config
        instruction = self.instruction
        zero_point = Signal(signed(16))
        clamp_min = Signal(signed(16))
        clamp_max = Signal(signed(16))
        param_addr = Signal(range(c.param_depth))
        out_stride = Signal(16)
        param_walk = Signal()   # each word the next groups' parameters
        from_map = Signal()   # SETOUT from_map (NPUs with requant_from_map)
        if c.requant_from_map:
            with m.If(self.set_out):
                m.d.sync += from_map.eq(instruction_field(instruction, Opcode.SETOUT,
                                                          "from_map"))
            with m.If(self.run_start):
                m.d.sync += from_map.eq(0)
        with m.If(self.set_pp):
            m.d.sync += [
                zero_point.eq(instruction_field(instruction, Opcode.SETPP, "zero_point")),
                clamp_min.eq(instruction_field(instruction, Opcode.SETPP, "clamp_min")),
                clamp_max.eq(instruction_field(instruction, Opcode.SETPP, "clamp_max")),
            ]
        with m.If(self.set_req):
            m.d.sync += [
                param_addr.eq(instruction_field(instruction, Opcode.SETREQ, "param_addr")),
                out_stride.eq(instruction_field(instruction, Opcode.SETREQ, "out_stride")),
                param_walk.eq(instruction_field(instruction, Opcode.SETREQ, "param_walk")),
            ]
        return {"zero_point": zero_point, "clamp_min": clamp_min, "clamp_max": clamp_max,
                "param_addr": param_addr, "out_stride": out_stride, "from_map": from_map,
                "param_walk": param_walk}

    def _lanes(self, m, settings, stage_valid, stage_from_map, stage_group, rq_left_shift,
               rq_single, rq_even):
        """The ``requant_lanes`` requantizers, fed the group in the input register (from
        the accumulators, or the activations' lanes sign-extended) and its parameters."""
        c = self._config
        lanes = c.requant_lanes
        # The lanes: one group selector feeding every lane (slicing a shared expression
        # per lane would emit one selector per lane).
        requantizers = []
        for lane in range(lanes):
            rq = Requantizer(accumulator_width=c.accumulator_width, output_width=c.input_width,
                             rounding=c.rounding, left_shift=c.requant_to_acc,
                             implementation=self._implementation,
                             serial_bits=c.requant_serial_bits)
            m.submodules[f"requant{lane}"] = rq
            requantizers.append(rq)
        input_valid = Signal()
        input_acc = Signal(lanes * c.accumulator_width)
        from_acc = self.acc_read.data.word_select(stage_group, lanes * c.accumulator_width)
        m.d.sync += input_valid.eq(stage_valid)
        if c.requant_from_map:
            group = self.act_read.data.word_select(stage_group, lanes * c.input_width)
            extended = [Signal(signed(c.accumulator_width), name=f"rq_map_lane{lane}")
                        for lane in range(lanes)]
            m.d.comb += [value.eq(group.word_select(lane, c.input_width).as_signed())
                         for lane, value in enumerate(extended)]
            m.d.sync += input_acc.eq(Mux(stage_from_map, Cat(*extended), from_acc))
        else:
            m.d.sync += input_acc.eq(from_acc)
        m.d.comb += Cat(*[rq.acc for rq in requantizers]).eq(input_acc)
        lane_bits = c.param_lane_width
        param_fields = param_lane_fields(c.accumulator_width)
        for lane, rq in enumerate(requantizers):
            params = self.param_read.data[lane * lane_bits:(lane + 1) * lane_bits]
            m.d.comb += rq.valid.eq(input_valid)
            # Each field to the requantizer's port of its name, the bits it reads.
            m.d.comb += [getattr(rq, f.name).eq(params[f.offset:f.offset + f.read_width])
                         for f in param_fields]
            m.d.comb += [
                rq.zero_point.eq(settings["zero_point"]),
                rq.clamp_min.eq(settings["clamp_min"]),
                rq.clamp_max.eq(settings["clamp_max"]),
                rq.left_shift.eq(rq_left_shift),
                rq.single.eq(rq_single),
                rq.even.eq(rq_even),
            ]

        return requantizers

    def _write_back(self, m, requantizers, out_valid, out_word, out_lane, rq_to_acc):
        """The lanes' results to the activations, in the lanes of their output word,
        unless the REQUANT goes to the accumulators (``rq_to_acc``)."""
        c = self._config
        rows, lanes = c.rows, c.requant_lanes
        chunk = Cat(*[rq.out for rq in requantizers])
        act = memories(c)[Region.ACTIVATIONS]
        per_lane = c.input_width // act.granularity
        blocks = rows // lanes
        # One hit bit per block of `lanes` activation lanes, decoded once; the write
        # enables of the block's lanes copy it.
        block_hit = Signal(blocks)
        out_block = out_lane // lanes
        m.d.comb += block_hit.eq(Cat(*[out_block == block for block in range(blocks)]))
        m.d.comb += [
            self.act_write.valid.eq(out_valid & self.running & ~rq_to_acc),
            self.act_write.addr.eq(out_word),
            self.act_write.data.eq(Cat(*[chunk] * blocks)),
            self.act_write.en.eq(Cat(*[block_hit[block].replicate(per_lane * lanes)
                                       for block in range(blocks)])),
        ]
