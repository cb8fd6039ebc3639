"""The data plane's one flow-control object: pausing and resuming reading, each idempotent."""

from twisted.internet.testing import StringTransport

from txgateway.dataplane.flow import ReadingControl


def test_a_second_pause_does_not_pause_again_and_one_resume_reads_again():
    transport = StringTransport()
    reading = ReadingControl(transport)
    reading.pause_reading()
    reading.pause_reading()
    assert transport.producerState == "paused" and reading.paused
    reading.resume_reading()
    assert transport.producerState == "producing" and not reading.paused


def test_resuming_a_transport_that_was_never_paused_does_nothing():
    class Counting(StringTransport):
        resumed = 0

        def resumeProducing(self):
            self.resumed += 1
            super().resumeProducing()

    transport = Counting()
    reading = ReadingControl(transport)
    reading.resume_reading()
    assert transport.resumed == 0
    reading.pause_reading()
    reading.resume_reading()
    reading.resume_reading()
    assert transport.resumed == 1
