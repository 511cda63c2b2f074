"""Helpers next to notebooks/local_code_and_files.ipynb. celery_nb ships this module with every
job that needs it, so the containers import it as the kernel does: nothing to install."""
import csv
import statistics


def read_rows(path):
    """The measurements of a CSV file with columns station and temperature."""
    with open(path, newline="") as f:
        return [{"station": row["station"], "temperature": float(row["temperature"])} for row in csv.DictReader(f)]


def summarize(rows):
    """Per station: how many readings and their mean temperature."""
    by_station = {}
    for row in rows:
        by_station.setdefault(row["station"], []).append(row["temperature"])
    return {station: {"readings": len(values), "mean": round(statistics.mean(values), 2)}
            for station, values in sorted(by_station.items())}
