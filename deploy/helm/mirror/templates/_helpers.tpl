{{/* Names and labels shared by the templates. */}}

{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirror.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding upstream credentials and htpasswd, if the chart makes one. */}}
{{- define "mirror.secretName" -}}
{{- include "mirror.fullname" . }}
{{- end }}

{{- define "mirror.upstreamSecret" -}}
{{- if .Values.upstreamCredentials.existingSecret }}
{{- .Values.upstreamCredentials.existingSecret }}
{{- else if .Values.upstreamCredentials.password }}
{{- include "mirror.secretName" . }}
{{- end }}
{{- end }}

{{- define "mirror.htpasswdSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.htpasswd }}
{{- include "mirror.secretName" . }}
{{- end }}
{{- end }}

{{- define "mirror.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* A probe from values, its httpGet speaking the listener's scheme. */}}
{{- define "mirror.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if $probe.httpGet }}
{{- $_ := set $probe.httpGet "scheme" (include "mirror.scheme" .root) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}
