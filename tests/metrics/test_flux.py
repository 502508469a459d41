"""The Flux result mapping, on real influxdb-client result objects.

No InfluxDB 2.x runs here (Flux exists nowhere else), so the tables come from
influxdb-client's own parser reading annotated CSV in the format InfluxDB 2.x answers
/api/v2/query with (docs.influxdata.com, "Annotated CSV"), exactly as query_api() builds
them from a live response.
"""

import datetime
import io

import pytest
import urllib3
from influxdb_client.client.flux_csv_parser import FluxCsvParser, FluxSerializationMode

from metrics import client
from metrics.selectors import HISTORY_FIELDS, flux_hourly_rows

AGENT = "5f0c4e39-7a35-4d1e-9a43-0d3c8f3a6f10"
TENANT = "0b9d1a1e-5a57-4c55-b7f4-7b8f2d9c1e22"

# What _FLUX's aggregateWindow(every: 1h, fn: mean, timeSrc: "_start") answers: one table
# per field, each record an hour's mean. Tables arrive by group key, not by time; hour 11
# has no belief_entropy and hour 09 only energy_level.
ANNOTATED_CSV = f"""\
#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,double,string,string,string,string
#group,false,false,true,true,false,false,true,true,true,true
#default,_result,,,,,,,,,
,result,table,_start,_stop,_time,_value,_field,_measurement,agent_id,tenant_id
,,0,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T10:00:00Z,0.75,belief_entropy,agent_beliefs,{AGENT},{TENANT}
,,0,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T08:00:00Z,1.25,belief_entropy,agent_beliefs,{AGENT},{TENANT}
,,1,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T09:00:00Z,42,energy_level,agent_beliefs,{AGENT},{TENANT}
,,1,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T11:00:00Z,40.5,energy_level,agent_beliefs,{AGENT},{TENANT}
,,2,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T11:00:00Z,-3.5,free_energy,agent_beliefs,{AGENT},{TENANT}
,,2,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T08:00:00Z,2.5,free_energy,agent_beliefs,{AGENT},{TENANT}
,,2,2026-11-30T08:00:00Z,2026-11-30T12:00:00Z,2026-11-30T10:00:00Z,1e-3,free_energy,agent_beliefs,{AGENT},{TENANT}

"""


def _tables(text: str):
    """FluxTables as query_api().query() returns them for this response body."""
    response = urllib3.HTTPResponse(body=io.BytesIO(text.encode()), preload_content=False)
    parser = FluxCsvParser(response=response, serialization_mode=FluxSerializationMode.tables)
    list(parser.generator())
    return parser.table_list()


def _hour(h: int) -> datetime.datetime:
    return datetime.datetime(2026, 11, 30, h, tzinfo=datetime.UTC)


def test_flux_tables_become_one_row_per_hour_with_every_field():
    rows = flux_hourly_rows(client.flux_records(_tables(ANNOTATED_CSV)))
    empty = dict.fromkeys(HISTORY_FIELDS)
    assert rows == [
        {**empty, "time": _hour(8), "free_energy": 2.5, "belief_entropy": 1.25},
        {**empty, "time": _hour(9), "energy_level": 42.0},
        {**empty, "time": _hour(10), "free_energy": 0.001, "belief_entropy": 0.75},
        {**empty, "time": _hour(11), "free_energy": -3.5, "energy_level": 40.5},
    ]
    assert all(row["time"].utcoffset() == datetime.timedelta(0) for row in rows)


def test_flux_rows_match_the_influxql_rows_shape():
    # The chart reads both languages' rows the same way: the same keys, floats or None.
    rows = flux_hourly_rows(client.flux_records(_tables(ANNOTATED_CSV)))
    for row in rows:
        assert set(row) == {"time", *HISTORY_FIELDS}
        assert all(row[name] is None or isinstance(row[name], float) for name in HISTORY_FIELDS)


def test_an_empty_flux_answer_is_no_rows():
    assert flux_hourly_rows(client.flux_records(_tables("\n"))) == []


@pytest.mark.parametrize("hour", [8, 10])
def test_records_are_plain_dicts_with_the_columns(hour):
    records = client.flux_records(_tables(ANNOTATED_CSV))
    assert len(records) == 7
    at_hour = [r for r in records if r["_time"] == _hour(hour) and r["_field"] == "free_energy"]
    assert len(at_hour) == 1
    assert at_hour[0]["agent_id"] == AGENT and at_hour[0]["tenant_id"] == TENANT
    assert type(at_hour[0]) is dict
