"""The NPU: its memories, the systolic array and the units around them, connected.

Each unit is a component in its own file, with the issue rules it keeps (the golden
model's :class:`~npugen.golden.CycleModel` mirrors them cycle for cycle, with the
constants of ``sw/timing.py``):

- ``host_port.py``: the host bus, the memories' access outside a run, the registers;
  ``counters.py``: the performance counters and UPTIME;
- ``sequencer.py``: fetch, and at most one dispatch a cycle, in order, when the step's
  units are free; ``gemm.py``: a GEMM's expansion into LOADW/MATMUL steps;
- ``weight_loader.py`` (LOADW) shifts a tile into one bank while ``feeder.py`` (MATMUL)
  streams activations through the other, so preload is hidden;
- ``accumulate.py``: results leave the array ``array_latency`` cycles after entering it
  and are added into the accumulator memory (read-modify-write, forwarded for
  back-to-back rows);
- ``requant_unit.py`` (REQUANT) runs ``requant_lanes`` channels a cycle once the array
  has drained and blocks dispatch until its last write;
- ``rescale_unit.py`` (TABLE, RESCALE; NPUs generated with ``rescale_tables``) looks an
  add's inputs up in tables of their rescaled values, a word a cycle into the
  accumulate path.

The feature-map hardware's address walks are sub-units of the GEMM expansion, the feeder
and the requantization unit (``tap_walk.py``, ``feed_walk.py``, ``out_walk.py``), each
with a linear stand-in that NPUs generated without ``feature_maps`` have instead; REQUANT
to_acc is a sub-unit of the requantization unit (``to_acc.py``) that they do not have,
nor NPUs generated without ``adds``.

Each memory has one read and one write port: the host's accesses are their defaults, and
the units' requests (``ports.py``) are granted over them in a fixed order.

What the NPU is implemented on (``implementation.py``: the FPGA family whose DSP blocks and
SPRAM are instantiated by hand, the array's DSP budget) is given to its constructor and
passed to the array, the requantization unit and the memories (``dsp.py``, ``ram.py``).
"""

import dataclasses

from amaranth import Array, Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import MemoryInfo, Region, memories, parted_memories
from .accumulate import AccumulatePath
from .array import SystolicArray
from .counters import PerformanceCounters
from .feeder import Feeder
from .fill_unit import FillUnit
from .host_port import HostPort
from .hostbus import HostBus
from .implementation import GENERIC, Implementation, check_implementation
from .ports import grant_read, grant_write
from .ram import SPRAM_BLOCKS, extra_read_port, memory_ports, spram_plan
from .requant_unit import RequantUnit
from .rescale_unit import RescaleUnit
from .sequencer import Sequencer
from .weight_loader import WeightLoader

__all__ = ["Npu"]


class Npu(wiring.Component):
    """The whole NPU behind a 32-bit memory-mapped host port (see ``memory_map``).

    ``running`` is high during a run; ``done`` rises when a run reaches HALT.
    ``implementation``: what it is built for (default: the generic design).
    """

    host: In(HostBus())
    running: Out(1)
    done: Out(1)

    def __init__(self, config: NpuConfig, *, implementation: Implementation = GENERIC):
        self._config = check_config_type(config)
        self._implementation = check_implementation(implementation)
        super().__init__()

    @property
    def config(self) -> NpuConfig:
        return self._config

    @property
    def implementation(self) -> Implementation:
        return self._implementation

    def elaborate(self, platform):
        c, implementation = self._config, self._implementation
        m = Module()
        infos = memories(c)
        reads, writes = {}, {}
        spram = spram_plan(implementation, infos, parted_memories(c))
        # A single-port (SPRAM) memory's address is the write port's while a unit writes:
        # the host's accesses put the same address on both ports, so its write decode
        # (the host bus's address into the region compare) stays off the address path.
        unit_writing = {region: Signal(name=f"{info.name}_unit_writing")
                        for region, info in infos.items()}
        unit_writes = {region: [] for region in infos}
        for region, info in infos.items():
            if region is Region.WEIGHTS and c.weight_segments > 1:
                continue   # in parts: _weight_parts
            # The SPRAM blocks the other memories take (all, for one the plan keeps in EBR).
            taken = sum(spram.values()) - spram[region] if spram[region] else SPRAM_BLOCKS
            writes[region], reads[region] = memory_ports(
                m, implementation, info, transparent=region is Region.ACCUMULATORS,
                spram_taken=taken, address_select=unit_writing[region])

        def grant_unit_write(region, request):
            grant_write(m, writes[region], request)
            unit_writes[region].append(request.valid & request.en.any())

        m.submodules.array = array = SystolicArray(c, implementation=implementation)
        m.submodules.host_port = host_port = HostPort(c)
        m.submodules.counters = counters = PerformanceCounters(c)
        m.submodules.sequencer = sequencer = Sequencer(c)
        m.submodules.weight_loader = loader = WeightLoader(c)
        m.submodules.feeder = feeder = Feeder(c)
        m.submodules.accumulate = accumulate = AccumulatePath(c)
        m.submodules.requant = requant = RequantUnit(c, implementation=implementation)
        running, instruction = sequencer.running, sequencer.instruction
        start, abort = host_port.start, host_port.abort

        # Host port, registers, counters. Seen from the host, a run begins with the
        # CONTROL write: no stale `done` in between.
        wiring.connect(m, wiring.flipped(self.host), host_port.host)
        m.d.comb += [
            self.running.eq(running | start), self.done.eq(sequencer.done & ~start),
            host_port.running.eq(running), host_port.done.eq(sequencer.done),
            host_port.aborted.eq(sequencer.aborted), host_port.illegal.eq(sequencer.illegal),
            host_port.pc.eq(sequencer.pc), host_port.counters.eq(counters.counters),
            host_port.uptime.eq(counters.uptime),
            counters.clear.eq(start), counters.running.eq(running),
            counters.stall.eq(sequencer.stall), counters.issue.eq(feeder.issuing),
        ]
        # The host owns the memories' ports outside a run: its accesses are their
        # defaults, which the units' grants (in this order, each overriding the last)
        # override during one.
        for region, info in infos.items():
            access = getattr(host_port, info.name)
            if region is Region.WEIGHTS and c.weight_segments > 1:
                weight_parts = self._weight_parts(m, infos[region], access)
                continue
            m.d.comb += [reads[region].addr.eq(access.addr), writes[region].addr.eq(access.addr),
                         writes[region].data.eq(access.data), writes[region].en.eq(access.en),
                         access.read_data.eq(reads[region].data)]

        # Sequencer: the units' state in, a step's strobe and fields out.
        m.d.comb += [
            sequencer.start.eq(start), sequencer.abort.eq(abort),
            sequencer.start_pc.eq(host_port.start_pc),
            sequencer.load_busy.eq(loader.busy), sequencer.load_ready.eq(loader.ready),
            sequencer.load_filling.eq(loader.filling),
            sequencer.loading_bank.eq(loader.loading_bank),
            sequencer.feed_busy.eq(feeder.busy), sequencer.feed_ready.eq(feeder.ready),
            sequencer.feeding_bank.eq(feeder.feeding_bank),
            sequencer.inflight_idle.eq(feeder.inflight_idle),
            sequencer.drain_idle.eq(feeder.drain_idle),
            sequencer.requant_active.eq(requant.active),
            sequencer.requant_overlap.eq(requant.overlap),
        ]
        # FILL (feature-map hardware) takes the requantizer's write port, like a REQUANT
        # with overlap.
        if c.feature_maps:
            m.submodules.fill = fill = FillUnit(c)
            m.d.comb += [
                fill.instruction.eq(instruction), fill.dispatch.eq(sequencer.fill),
                fill.abort.eq(abort), fill.running.eq(running),
                sequencer.requant_active.eq(requant.active | fill.active),
                sequencer.requant_overlap.eq(requant.overlap | fill.active),
            ]
        # TABLE and RESCALE (rescale_tables): the accumulate path's rows beside REQUANT
        # to_acc's (never at once: a RESCALE waits for the requantizer unless it overlaps,
        # and a to_acc REQUANT never overlaps).
        inject_read, inject, inject_row = requant.inject_read, requant.inject, requant.inject_row
        if c.rescale_tables:
            m.submodules.rescale = rescale = RescaleUnit(c)
            m.d.comb += [
                rescale.instruction.eq(instruction), rescale.table.eq(sequencer.table),
                rescale.rescale.eq(sequencer.rescale), rescale.set_win.eq(sequencer.set_win),
                rescale.run_start.eq(start), rescale.abort.eq(abort),
                rescale.running.eq(running), rescale.requant_busy.eq(requant.active | fill.active),
                sequencer.rescale_active.eq(rescale.rescaling),
                sequencer.table_active.eq(rescale.loading),
                # A TABLE takes the parameters' read port: like a FILL, it lets the array's
                # steps (REQUANT_OVERLAPPERS; the sequencer holds RESCALE) dispatch beside it.
                sequencer.requant_active.eq(requant.active | fill.active | rescale.loading),
                sequencer.requant_overlap.eq(requant.overlap | fill.active | rescale.loading),
            ]
            inject_read = Mux(rescale.inject_read.valid, rescale.inject_read.as_value(),
                              requant.inject_read.as_value())
            inject = Mux(rescale.inject.valid, rescale.inject.as_value(),
                         requant.inject.as_value())
            inject_row = Mux(rescale.inject.valid, rescale.inject_row.as_value(),
                             requant.inject_row.as_value())
        instruction_read = reads[Region.INSTRUCTIONS]
        m.d.comb += sequencer.fetch_data.eq(instruction_read.data)
        with m.If(running):
            m.d.comb += [instruction_read.addr.eq(sequencer.fetch_addr),
                         instruction_read.en.eq(sequencer.fetch_en)]

        # Weight loader and feeder: LOADW and MATMUL steps into the array.
        m.d.comb += [
            loader.dispatch.eq(sequencer.loadw), loader.abort.eq(abort),
            array.weight_row.eq(loader.weight_row), array.load.eq(loader.load),
            array.load_bank.eq(loader.load_bank),
        ]
        if c.paired_loads:   # a GEMM's next LOADW may go beside its MATMUL
            m.d.comb += [loader.bank.eq(sequencer.load_bank),
                         loader.weight_addr.eq(sequencer.load_weight_addr)]
        else:
            m.d.comb += [loader.bank.eq(sequencer.bank),
                         loader.weight_addr.eq(sequencer.weight_addr)]
        if c.weight_banks == 1:
            m.d.comb += array.load_index.eq(loader.load_index)
        if c.weight_segments > 1:
            grant_read(m, weight_parts[0], loader.weight_read)
            for part, request in zip(weight_parts[1:], loader.segment_read, strict=True):
                grant_read(m, part, request)
            m.d.comb += [array.segment_row.eq(loader.segment_row),
                         array.segment_load.eq(loader.segment_load),
                         array.segment_load_bank.eq(loader.segment_load_bank)]
        else:
            grant_read(m, reads[Region.WEIGHTS], loader.weight_read)
        m.d.comb += [
            feeder.dispatch.eq(sequencer.matmul), feeder.set_win.eq(sequencer.set_win),
            *[getattr(feeder, name).eq(getattr(sequencer, name))
              for name in ("bank", "act_addr", "acc_addr", "count", "accumulate", "combine")],
            feeder.instruction.eq(instruction), feeder.run_start.eq(start),
            feeder.abort.eq(abort), feeder.running.eq(running),
            array.act.eq(feeder.act), array.bank.eq(feeder.array_bank),
        ]
        if c.line_buffer_depth:
            m.d.comb += [array.depthwise.eq(feeder.array_depthwise),
                         array.line_delay.eq(feeder.line_delay)]
        grant_read(m, reads[Region.ACTIVATIONS], feeder.act_read)

        # Accumulate path: the array's result rows (and REQUANT to_acc's) into the
        # accumulators.
        m.d.comb += [
            accumulate.issue.eq(feeder.issue), accumulate.result.eq(array.result),
            accumulate.running.eq(running),
            accumulate.inject_read.eq(inject_read), accumulate.inject.eq(inject),
            accumulate.inject_row.eq(inject_row),
        ]
        grant_read(m, reads[Region.ACCUMULATORS], accumulate.acc_read)
        grant_unit_write(Region.ACCUMULATORS, accumulate.acc_write)

        # Requantization unit: REQUANT, SETPP, SETREQ, SETOUT.
        m.d.comb += [
            requant.instruction.eq(instruction), requant.dispatch.eq(sequencer.requant),
            requant.set_pp.eq(sequencer.set_pp), requant.set_req.eq(sequencer.set_req),
            requant.set_out.eq(sequencer.set_out), requant.run_start.eq(start),
            requant.abort.eq(abort), requant.running.eq(running),
        ]
        if c.requant_overlap:   # a REQUANT may dispatch beside the feeder's stream
            m.d.comb += [requant.drain_wait.eq(feeder.drain_wait),
                         requant.drained.eq(~feeder.busy & feeder.drain_idle)]
        grant_read(m, reads[Region.PARAMS], requant.param_read)
        # With requant_overlap the requantizer reads the accumulators through a port of
        # its own, while MATMULs go on through the first.
        grant_read(m, extra_read_port(m, implementation, infos[Region.ACCUMULATORS])
                   if c.requant_overlap else reads[Region.ACCUMULATORS], requant.acc_read)
        grant_unit_write(Region.ACTIVATIONS, requant.act_write)
        if c.requant_from_map:   # a REQUANT to_acc's source map; the feeder is idle then
            grant_read(m, reads[Region.ACTIVATIONS], requant.act_read)
        if c.feature_maps:
            grant_unit_write(Region.ACTIVATIONS, fill.act_write)
        if c.rescale_tables:
            grant_read(m, reads[Region.ACTIVATIONS], rescale.act_read)
            grant_read(m, reads[Region.PARAMS], rescale.param_read)
        m.d.comb += [unit_writing[region].eq(Cat(*requests).any())
                     for region, requests in unit_writes.items() if requests]
        return m

    def _weight_parts(self, m: Module, info: MemoryInfo, access) -> list:
        """The weight memory of an NPU with ``weight_segments`` S: S parts of depth / S
        words, part s holding rows s·L to s·L + L − 1 of every tile (L = rows / S), and
        the host's ``access`` to them at the words' addresses as the programs give them:
        word a is row a mod rows of tile a div rows, so part (a div L) mod S holds it at
        (a div rows)·L + a mod L. Returns the parts' read ports (the loader's)."""
        c = self._config
        low = c.load_rows.bit_length() - 1        # log2 L
        high = c.rows.bit_length() - 1            # log2 rows
        which = access.addr[low:high]
        within = Cat(access.addr[:low], access.addr[high:])
        part_info = dataclasses.replace(info, depth=info.depth // c.weight_segments)
        reads, read_from = [], Signal.like(which, name="weights_read_part")
        m.d.sync += read_from.eq(which)   # the part whose word the read port returns
        for s in range(c.weight_segments):
            part = dataclasses.replace(part_info, name=f"weights_part{s}")
            # In block RAM (no SPRAM): the parts are shallow, and read together.
            write, read = memory_ports(m, self._implementation, part, spram_taken=SPRAM_BLOCKS)
            m.d.comb += [write.addr.eq(within), write.data.eq(access.data),
                         write.en.eq(Mux(which == s, access.en, 0)), read.addr.eq(within)]
            reads.append(read)
        m.d.comb += access.read_data.eq(Array(read.data for read in reads)[read_from])
        return reads
