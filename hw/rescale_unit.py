"""The rescale unit (NPUs generated with ``rescale_tables``): TABLE loads two tables of
``2^input_width`` accumulator-wide entries from parameter words, and RESCALE looks up
every lane of a walk of activation words in one of them and sends the rows down the
accumulate path, one word a cycle. An add's input rescale (TFLite's Add: the input,
shifted left and rescaled) depends on the input's value alone, so a table of it replaces
a pass of the requantizer, whose lanes take ``cols / requant_lanes`` cycles a word.

Each column has its own copy of the tables (a read port a lane: on ECP5 a block RAM a
column). The words follow SETWIN's walk (the unit keeps its own copy of it, as the
feeder does).

Timing (``sw/timing.py``; the cycle model's RESCALE and TABLE rules): a RESCALE
dispatched in cycle ``d`` reads its words in cycles ``d + 1 … d + count``; a word read in
cycle ``r`` is looked up in ``r + 1``, its entries registered in ``r + 2`` (its
destination word is read then), joins the accumulate path in ``r + 3`` and is written in
``r + 4``; ``rescaling`` falls in the cycle of the last write (``RESCALE_TAIL_CYCLES``). A
TABLE dispatched in ``d`` reads a parameter word in each of the cycles ``d + 1 … d + N``
(``NpuConfig.table_load_cycles``), selects its entry the cycle after and writes it the
cycle after that; ``loading`` falls in ``d + N + 3`` (``TABLE_TAIL_CYCLES``).
A TABLE dispatched beside a REQUANT or FILL (``requant_busy``) starts in the first cycle
the requantizer is idle instead, as if dispatched then. The sequencer lets the array's
steps dispatch beside a TABLE, as beside a FILL.
"""

from amaranth import Cat, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH, Opcode
from ..layouts import TABLE_FIELDS, param_lane_fields
from ..memory_map import Region, memories
from .feed_walk import WindowWalk
from .instruction import instruction_field
from .ports import ReadRequest
from .to_acc import inject_layout, inject_members

__all__ = ["RescaleUnit"]


class RescaleUnit(wiring.Component):
    """Runs the TABLE (``table``) or RESCALE (``rescale``) held in ``instruction`` from the
    cycle its strobe is high. ``set_win`` loads the SETWIN held in ``instruction`` into
    the unit's walk; ``run_start`` restores its defaults; ``abort`` stops the unit (the
    writes of words in flight are refused: they are gated by ``running``). ``rescaling``
    is high until the cycle of a RESCALE's last write (the sequencer dispatches nothing
    meanwhile), ``loading`` from a TABLE's dispatch until the cycle after its last write
    (no RESCALE, TABLE nor requantizer step dispatches meanwhile); ``requant_busy`` says
    the requantizer or the fill unit is at work, which a TABLE waits for.

    ``act_read`` and ``param_read`` claim the activations' and the parameters' read
    ports; ``inject_read``, ``inject`` and ``inject_row`` send the rows down the
    accumulate path as REQUANT to_acc's do (hw/to_acc.py)."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        if not config.rescale_tables:
            raise ValueError("the rescale unit is for NPUs generated with rescale_tables")
        infos = memories(config)
        act, params = infos[Region.ACTIVATIONS], infos[Region.PARAMS]
        super().__init__({
            "instruction": In(INSTRUCTION_WIDTH),
            "table": In(1),
            "rescale": In(1),
            "set_win": In(1),
            "run_start": In(1),
            "abort": In(1),
            "running": In(1),
            "requant_busy": In(1),
            "rescaling": Out(1),
            "loading": Out(1),
            "act_read": Out(ReadRequest(depth=act.depth, data_width=act.width)),
            "param_read": Out(ReadRequest(depth=params.depth, data_width=params.width)),
            **inject_members(config),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        tables = []
        for column in range(c.cols):
            # Never read and written in the same cycle (no RESCALE dispatches while a TABLE
            # loads): no logic for a collision.
            table = Memory(shape=signed(c.accumulator_width), depth=2 * c.table_entries,
                           init=[], attrs={"no_rw_check": 1})
            m.submodules[f"table{column}"] = table
            tables.append((table.write_port(), table.read_port()))

        table_busy, table_writing = self._table_load(m, tables)
        rescale_busy, lookup_valid, inject_valid = self._rescale(m, tables)
        m.d.comb += [self.loading.eq(table_busy | table_writing),
                     self.rescaling.eq(rescale_busy | lookup_valid | inject_valid)]
        return m

    def _table_load(self, m: Module, tables: list) -> tuple[Signal, Signal]:
        """TABLE: the parameter words read one a cycle (the same word for its lanes of
        table 0, then of table 1), each entry written to every column's copy the cycle
        after. Returns the read's and the writes' busy flags."""
        c = self._config
        lanes = c.requant_lanes

        def field(name):
            return instruction_field(self.instruction, Opcode.TABLE, name)

        busy = Signal(name="table_busy")
        pending = Signal(name="table_pending")   # dispatched, the requantizer still busy
        word = Signal(range(c.param_depth), name="table_word")
        lane = Signal(range(lanes), name="table_lane")
        which = Signal(name="table_which")         # table 0 or 1
        entry = Signal(range(c.table_param_words * lanes + 1), name="table_entry")
        last_word = Signal(range(c.param_depth), name="table_last_word")
        with m.If(self.table):
            m.d.sync += [pending.eq(1), word.eq(field("param_addr")), lane.eq(0),
                         which.eq(0), entry.eq(0),
                         last_word.eq(field("param_addr") + c.table_param_words - 1)]
        with m.If((self.table | pending) & ~self.requant_busy):
            m.d.sync += [busy.eq(1), pending.eq(0)]
        # Gated by running: a run stopped beside a TABLE (an illegal step) leaves the port
        # to the host.
        m.d.comb += [self.param_read.valid.eq(busy & self.running),
                     self.param_read.addr.eq(word)]
        # The write of the entry requested this cycle, the cycle after (the read's data).
        writing = Signal(name="table_writing")
        write_lane = Signal.like(lane)
        write_which = Signal()
        write_entry = Signal.like(entry)
        m.d.sync += [writing.eq(busy & ~self.abort), write_lane.eq(lane),
                     write_which.eq(which), write_entry.eq(entry)]
        with m.If(busy):
            with m.If(lane == lanes - 1):
                m.d.sync += [lane.eq(0), which.eq(~which)]
                with m.If(which):
                    m.d.sync += [word.eq(word + 1), entry.eq(entry + lanes)]
                    with m.If(word == last_word):
                        m.d.sync += busy.eq(0)
            with m.Else():
                m.d.sync += lane.eq(lane + 1)
        with m.If(self.abort | self.run_start):
            m.d.sync += [busy.eq(0), pending.eq(0)]
        # The entry: lane write_lane's bias field (table 0) or multiplier field (table 1),
        # its low accumulator_width bits.
        fields = {f.name: f for f in param_lane_fields(c.accumulator_width)}
        lane_bits = c.param_lane_width
        value = Signal(signed(c.accumulator_width), name="table_value")
        with m.Switch(Cat(write_lane, write_which)):
            for which_table, name in enumerate(TABLE_FIELDS):
                offset = fields[name].offset
                for j in range(lanes):
                    with m.Case(j | (which_table << len(write_lane))):
                        start = j * lane_bits + offset
                        m.d.comb += value.eq(
                            self.param_read.data[start:start + c.accumulator_width])
        # Registered before the tables: the parameters' block RAM and the lane multiplexer
        # end here, not at a block RAM across the chip (the 45F's slowest path otherwise).
        index = write_entry + write_lane
        stored = Signal(signed(c.accumulator_width), name="table_stored")
        stored_addr = Signal(len(tables[0][0].addr), name="table_stored_addr")
        storing = Signal(name="table_storing")
        m.d.sync += [stored.eq(value), stored_addr.eq(Cat(index[:c.input_width], write_which)),
                     storing.eq(writing & ~self.abort & (index < c.table_entries))]
        for write, _ in tables:
            m.d.comb += [write.addr.eq(stored_addr), write.data.eq(stored),
                         write.en.eq(storing & self.running)]
        return busy | pending, writing | storing

    def _rescale(self, m: Module, tables: list) -> tuple[Signal, Signal, Signal]:
        """RESCALE: the walk's words read one a cycle, each lane looked up in its column's
        copy of the table the cycle after (the destination word read beside it), the row
        sent down the accumulate path the cycle after that. Returns the stages' flags."""
        c = self._config

        def field(name):
            return instruction_field(self.instruction, Opcode.RESCALE, name)

        m.submodules.walk = walk = WindowWalk(c)
        busy = Signal(name="rescale_busy")
        remaining = Signal(16, name="rescale_remaining")
        which = Signal(name="rescale_table")
        accumulate = Signal(name="rescale_accumulate")
        m.d.comb += [
            walk.instruction.eq(self.instruction), walk.set_win.eq(self.set_win),
            walk.run_start.eq(self.run_start), walk.ready.eq(~busy),
            walk.start.eq(self.rescale), walk.start_act_addr.eq(field("act_addr")),
            walk.start_acc_addr.eq(field("acc_addr")), walk.step.eq(busy),
            self.act_read.valid.eq(busy), self.act_read.addr.eq(walk.act_addr),
        ]
        with m.If(self.rescale):
            m.d.sync += [busy.eq(field("count") != 0), remaining.eq(field("count")),
                         which.eq(field("table")), accumulate.eq(field("accumulate"))]
        with m.If(busy):
            m.d.sync += [remaining.eq(remaining - 1), busy.eq(remaining != 1)]
        # The word read in the cycle before: its lanes look up. The cycle after, the
        # entries are registered (the tables' block RAMs end there, not at the accumulate
        # path's adders) and the destination word is read; then the row joins the path.
        lookup = Signal(inject_layout(c), name="rescale_lookup")
        looked = Signal(inject_layout(c), name="rescale_looked")
        m.d.sync += [lookup.valid.eq(busy & ~self.abort), lookup.addr.eq(walk.acc_addr),
                     lookup.accumulate.eq(accumulate), looked.eq(lookup)]
        word = self.act_read.data
        for column, (_, read) in enumerate(tables):
            lane = word[column * c.input_width:(column + 1) * c.input_width]
            m.d.comb += read.addr.eq(Cat(lane, which))
        row = Signal.like(self.inject_row, reset_less=True, name="rescale_row")
        m.d.sync += row.eq(Cat(*[read.data for _, read in tables]))
        m.d.comb += [self.inject_read.valid.eq(looked.valid & self.running),
                     self.inject_read.addr.eq(looked.addr),
                     self.inject_read.accumulate.eq(looked.accumulate),
                     self.inject_row.eq(row)]
        m.d.sync += self.inject.eq(self.inject_read)
        with m.If(self.abort):
            m.d.sync += [busy.eq(0), lookup.valid.eq(0), looked.valid.eq(0),
                         self.inject.valid.eq(0)]
        return busy, lookup.valid | looked.valid, self.inject.valid
